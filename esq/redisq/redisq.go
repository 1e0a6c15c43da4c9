// Package redisq is an esq.Queue over Redis publish/subscribe
// (github.com/redis/go-redis/v9, imported only here).
//
// Each entity type is one channel, ChannelPrefix + entity type, published
// with PUBLISH and received with SUBSCRIBE (never a pattern), so every server
// receives every message. Redis pub/sub delivers at most once and keeps
// nothing: a message published while a server's subscriber connection is
// down is gone, and so is everything Redis drops when it disconnects a
// subscriber that fell behind (client-output-buffer-limit pubsub). Both end
// in a reconnect, and once Redis has confirmed the subscriptions on the new
// connection, onLoss is called for each, so the bridge re-fetches its
// subscribed keys.
//
// All of one Queue's subscriptions share one connection, read by one
// goroutine that calls the callbacks in order.
//
// With Config.RouteByKey, a server receives only the keys its clients
// watch (esq.Interest): a notification of one key (or of up to
// esq.MaxRoutedKeys) goes on the key's own channel, the entity type's
// channel plus ":k:" and esq.RouteToken(id), to which the bridge
// subscribes from the key's first local subscriber to its last. Every
// server still subscribes to the entity type's channel, which carries
// larger batches and whatever other producers publish there. After a
// reconnect, onLoss waits until Redis has confirmed the entity type's
// channel and every watched key channel again.
//
// Use with entitysync:
//
//	q, err := redisq.New(ctx, redisq.Config{Addr: "127.0.0.1:6379", ChannelPrefix: "myapp:es:"})
//	if err != nil { ... }
//	e, err := entitysync.New(entitysync.Config{Queue: q})
package redisq

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esq/internal/watches"
	"github.com/entity-sync/entity-sync/shared"
)

// MaxChannelLength is the longest channel name (prefix included) of an
// entity type. With RouteByKey, a key's channel adds 19 bytes to its entity
// type's (":k:" and the token).
const MaxChannelLength = 1024

// DefaultMaxPayload is Config.MaxPayload's default: 1 MiB, as NSQ's and
// NATS's default limits. A notification is a key of a few dozen bytes.
const DefaultMaxPayload = 1 << 20

// Config configures a Queue. Only Addr is commonly set.
type Config struct {
	// Addr is the Redis server's host:port. Default "127.0.0.1:6379".
	Addr string
	// ChannelPrefix is put before every entity type to make its channel
	// ("myapp:es:" gives "myapp:es:items"), so several applications can
	// share one Redis. It may not contain whitespace or control
	// characters.
	ChannelPrefix string
	// Options, if not nil, are the go-redis options to start from
	// (password, TLS, timeouts, ...); Addr overrides their Addr when set.
	// By default go-redis does not retry a failed PUBLISH (MaxRetries -1), so
	// a publish is never sent twice: set MaxRetries here to change that.
	Options *redis.Options
	// MaxPayload is the largest body Publish accepts, in bytes. Default
	// DefaultMaxPayload. Redis itself takes up to 512 MiB.
	MaxPayload int
	// LiveTimeout bounds how long Subscribe waits for Redis to confirm a
	// subscription. Default 10s.
	LiveTimeout time.Duration
	// RetryInterval is how long the subscriber waits between attempts to
	// reconnect to Redis. Default 100ms.
	RetryInterval time.Duration
	// PingInterval is how often the subscriber connection is pinged. A
	// connection on which nothing, not even a reply to a ping, arrives for
	// three intervals is taken as dead (a peer gone without a reset, a NAT
	// that forgot the connection): it is replaced, and onLoss is called as
	// for any reconnect. Default 5s.
	PingInterval time.Duration
	// Logger receives connection events. Default: logrus's standard logger.
	Logger logrus.FieldLogger
	// RouteByKey makes the queue route each key's notifications to the
	// servers that watch it (see the package comment) instead of
	// broadcasting them. Set it on every server of a cluster or on none: a
	// server that broadcasts does not hear what a routing one publishes on
	// key channels. Loss detection (esq.DetectLoss) does not apply to a
	// routing queue; the reconnect resync above does.
	RouteByKey bool
}

// Queue is an esq.Queue over Redis pub/sub.
type Queue struct {
	cfg     Config
	log     logrus.FieldLogger
	client  *redis.Client
	closing chan struct{}

	mu     sync.Mutex
	closed bool
	subs   map[string]*subscription // by channel
	// watches are the key channels Watch subscribed, by channel.
	watches watches.Set[*watch]
	ps      *redis.PubSub // made by the first Subscribe
	// readerDone and pingerDone are closed when the goroutines the first
	// Subscribe started end.
	readerDone, pingerDone chan struct{}
}

type subscription struct {
	channelState
	channel   string
	onMessage func([]byte)
	onLoss    func()
	// lost is set when the connection dropped while some channel of the
	// subscription was live, until they all are again; down counts its
	// channels (its own and its watches') not live. late counts its
	// watches whose Watch gave up waiting for the confirmation and that
	// are not confirmed yet; owed is set once one of them, or every
	// channel after a drop, is: onLoss is then due once lost and late are
	// clear, one call for them all (see due). Under Queue.mu.
	lost bool
	down int
	late int
	owed bool
}

// due reports whether s's onLoss is to be called now, and then clears
// what the call covers. With Queue.mu held.
func (s *subscription) due() bool {
	if s.lost && s.down == 0 {
		s.lost, s.owed = false, true
	}
	if s.owed && !s.lost && s.late == 0 {
		s.owed = false
		return true
	}
	return false
}

// channelState is one subscribed channel's.
type channelState struct {
	confirmed chan struct{} // closed when Redis first confirms the subscription
	isLive    bool          // confirmed and not lost since; under Queue.mu
}

// watch is a key channel subscribed for Watch (package watches counts
// them).
type watch struct {
	channelState
	s *subscription // the key's entity type's
	// late is set when a Watch gave up waiting for the confirmation:
	// whoever watches may have fetched meanwhile, so its arrival makes
	// onLoss due (see subscription.due). Under Queue.mu.
	late bool
}

var (
	_ esq.Queue    = (*Queue)(nil)
	_ esq.Interest = (*Queue)(nil)
	_ esq.KeyQueue = (*Queue)(nil)
)

// New checks that Redis answers (ctx bounds the PING) and returns a Queue.
func New(ctx context.Context, cfg Config) (*Queue, error) {
	var opt redis.Options
	if cfg.Options != nil {
		opt = *cfg.Options
	} else {
		opt.MaxRetries = -1
	}
	if cfg.Addr != "" {
		opt.Addr = cfg.Addr
	}
	if opt.Addr == "" {
		opt.Addr = "127.0.0.1:6379"
	}
	cfg.Addr = opt.Addr
	if cfg.MaxPayload == 0 {
		cfg.MaxPayload = DefaultMaxPayload
	}
	if cfg.MaxPayload < 0 {
		return nil, fmt.Errorf("redisq: Config.MaxPayload is %d, must be positive", cfg.MaxPayload)
	}
	if cfg.LiveTimeout == 0 {
		cfg.LiveTimeout = 10 * time.Second
	}
	if cfg.RetryInterval == 0 {
		cfg.RetryInterval = 100 * time.Millisecond
	}
	if cfg.PingInterval == 0 {
		cfg.PingInterval = 5 * time.Second
	}
	if cfg.LiveTimeout < 0 || cfg.RetryInterval < 0 || cfg.PingInterval < 0 {
		return nil, errors.New("redisq: Config.LiveTimeout, RetryInterval and PingInterval must not be negative")
	}
	if cfg.Logger == nil {
		cfg.Logger = logrus.StandardLogger()
	}
	if err := checkChannel(cfg.ChannelPrefix); err != nil {
		return nil, fmt.Errorf("redisq: Config.ChannelPrefix %q: %w", cfg.ChannelPrefix, err)
	}
	client := redis.NewClient(&opt)
	if err := client.Ping(ctx).Err(); err != nil {
		client.Close()
		return nil, fmt.Errorf("redisq: Redis at %s does not answer: %w", opt.Addr, err)
	}
	return &Queue{
		cfg:     cfg,
		log:     cfg.Logger.WithField("component", "esq.redisq"),
		client:  client,
		closing: make(chan struct{}),
		subs:    make(map[string]*subscription),
	}, nil
}

// Channel returns the Redis channel for an entity type under prefix, or an
// error naming the rule it breaks.
func Channel(prefix string, entity shared.EntityType) (string, error) {
	if entity == "" {
		return "", errors.New(`redisq: entity type "" is not valid: it must not be empty`)
	}
	channel := prefix + entity.GetQueueName()
	if err := checkChannel(channel); err != nil {
		return "", fmt.Errorf("redisq: entity type %q gives Redis channel %q, which is not valid: %w",
			abbreviate(string(entity)), abbreviate(channel), err)
	}
	return channel, nil
}

func abbreviate(s string) string {
	if len(s) > 80 {
		return fmt.Sprintf("%s...(%d bytes)", s[:60], len(s))
	}
	return s
}

func checkChannel(s string) error {
	if len(s) > MaxChannelLength {
		return fmt.Errorf("longer than %d bytes", MaxChannelLength)
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c == 0x7f {
			return fmt.Errorf("whitespace or control character at byte %d", i)
		}
	}
	return nil
}

// Publish sends body on the entity type's channel with PUBLISH and returns
// once Redis accepted it.
func (q *Queue) Publish(ctx context.Context, entity shared.EntityType, body []byte) error {
	channel, err := q.publishChannel(entity)
	if err != nil {
		return err
	}
	if q.cfg.RouteByKey {
		if routed := esq.RouteByKey(entity, body); routed != nil {
			for _, r := range routed {
				if err := q.publish(ctx, keyChannel(channel, r.Token), r.Body); err != nil {
					return err
				}
			}
			return nil
		}
	}
	return q.publish(ctx, channel, body)
}

// PublishKey publishes key's notification as Publish does the body
// esq.KeyBody(key), which is what subscribers receive. With RouteByKey, it
// goes on the key's own channel without the body being decoded to find
// the key (see esq.KeyQueue).
func (q *Queue) PublishKey(ctx context.Context, key shared.EntityKey) error {
	channel, err := q.publishChannel(key.Entity)
	if err != nil {
		return err
	}
	if q.cfg.RouteByKey && key.ID != "" {
		channel = keyChannel(channel, esq.RouteToken(key.ID))
	}
	return q.publish(ctx, channel, esq.KeyBody(key))
}

// SubscribeKeys is Subscribe: every message reaches onMessage as its
// body, and onKey is not called (see esq.KeyQueue).
func (q *Queue) SubscribeKeys(entity shared.EntityType, onMessage func([]byte), _ func(shared.EntityKey), onLoss func()) error {
	return q.Subscribe(entity, onMessage, onLoss)
}

// KeyQueue returns q (see esq.KeyQueue).
func (q *Queue) KeyQueue() esq.Queue { return q }

// publishChannel returns the entity type's channel, or ErrClosed once the
// queue is closed.
func (q *Queue) publishChannel(entity shared.EntityType) (string, error) {
	q.mu.Lock()
	closed := q.closed
	q.mu.Unlock()
	if closed {
		return "", esq.ErrClosed
	}
	return Channel(q.cfg.ChannelPrefix, entity)
}

// keyChannel is the channel of the key whose esq.RouteToken is token.
func keyChannel(entityChannel, token string) string { return entityChannel + ":k:" + token }

func (q *Queue) publish(ctx context.Context, channel string, body []byte) error {
	if len(body) > q.cfg.MaxPayload {
		return fmt.Errorf("redisq: message of %d bytes on channel %q exceeds Config.MaxPayload of %d bytes", len(body), channel, q.cfg.MaxPayload)
	}
	if err := q.client.Publish(ctx, channel, body).Err(); err != nil {
		if errors.Is(err, redis.ErrClosed) {
			return esq.ErrClosed
		}
		return fmt.Errorf("redisq: publish on channel %q to %s: %w", channel, q.cfg.Addr, err)
	}
	return nil
}

// Subscribe subscribes to the entity type's channel and returns once Redis
// confirmed the subscription, so a message published after it returns is
// delivered. onLoss is called after the connection dropped and Redis
// confirmed the subscription on the new one.
func (q *Queue) Subscribe(entity shared.EntityType, onMessage func([]byte), onLoss func()) error {
	channel, err := Channel(q.cfg.ChannelPrefix, entity)
	if err != nil {
		return err
	}
	s := &subscription{channel: channel, onMessage: onMessage, onLoss: onLoss, down: 1,
		channelState: channelState{confirmed: make(chan struct{})}}
	q.mu.Lock()
	switch {
	case q.closed:
		q.mu.Unlock()
		return esq.ErrClosed
	case q.subs[channel] != nil:
		q.mu.Unlock()
		return esq.ErrAlreadySubscribed
	}
	q.subs[channel] = s
	if q.ps == nil {
		q.ps = q.client.Subscribe(context.Background())
		q.readerDone, q.pingerDone = make(chan struct{}), make(chan struct{})
		go q.read(q.ps, q.readerDone)
		go q.ping(q.ps, q.pingerDone)
	}
	ps := q.ps
	q.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), q.cfg.LiveTimeout)
	defer cancel()
	err = ps.Subscribe(ctx, channel)
	if err == nil {
		select {
		case <-s.confirmed:
			return nil
		case <-q.closing:
			err = esq.ErrClosed
		case <-ctx.Done():
			err = fmt.Errorf("no confirmation within %s", q.cfg.LiveTimeout)
		}
	}
	q.mu.Lock()
	delete(q.subs, channel)
	closed := q.closed
	q.mu.Unlock()
	if closed {
		return esq.ErrClosed
	}
	uctx, ucancel := context.WithTimeout(context.Background(), time.Second)
	_ = ps.Unsubscribe(uctx, channel) // so a reconnect does not subscribe it again
	ucancel()
	return fmt.Errorf("redisq: subscribe to channel %q on %s: %w", channel, q.cfg.Addr, err)
}

// Live returns nil while Redis has confirmed every subscription on the
// current subscriber connection, and an error naming the channels it has
// not (the connection was lost and go-redis is subscribing again).
func (q *Queue) Live() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return esq.ErrClosed
	}
	var down []string
	for _, s := range q.subs {
		if !s.isLive || s.lost {
			down = append(down, s.channel)
		}
	}
	if len(down) > 0 {
		slices.Sort(down)
		return fmt.Errorf("redisq: channel %s not subscribed on %s: reconnecting", strings.Join(down, ", "), q.cfg.Addr)
	}
	return nil
}

// read receives everything on the subscriber connection and calls the
// callbacks. go-redis reconnects and subscribes again to every channel
// after a read error; read notes the error and calls each subscription's
// onLoss when Redis confirms it again.
func (q *Queue) read(ps *redis.PubSub, done chan struct{}) {
	defer close(done)
	down := false
	for {
		// A read that times out makes go-redis replace the connection.
		ctx, cancel := context.WithTimeout(context.Background(), 3*q.cfg.PingInterval)
		m, err := ps.Receive(ctx)
		cancel()
		if err != nil {
			select {
			case <-q.closing:
				return
			default:
			}
			q.mu.Lock()
			for _, s := range q.subs {
				if s.isLive {
					s.isLive, s.lost = false, true
					s.down++
				}
			}
			q.watches.All(func(w *watch) {
				if w.isLive {
					w.isLive, w.s.lost = false, true
					w.s.down++
				}
			})
			q.mu.Unlock()
			if !down {
				q.log.WithError(err).Warn("Redis subscriber connection lost; reconnecting (changes published meanwhile will be recovered by a resync)")
				down = true
			}
			select {
			case <-q.closing:
				return
			case <-time.After(q.cfg.RetryInterval): // reconnect backoff
			}
			continue
		}
		switch m := m.(type) {
		case *redis.Message:
			q.mu.Lock()
			s := q.subs[m.Channel]
			if r := q.watches.Get(m.Channel); s == nil && r != nil {
				s = r.State.s
			}
			q.mu.Unlock()
			if s != nil {
				s.onMessage([]byte(m.Payload))
			}
		case *redis.Subscription:
			if m.Kind != "subscribe" {
				continue
			}
			q.mu.Lock()
			var st *channelState
			var w *watch
			s := q.subs[m.Channel]
			if s != nil {
				st = &s.channelState
			} else if r := q.watches.Get(m.Channel); r != nil {
				w = r.State
				st, s = &w.channelState, w.s
			}
			var lossFor *subscription
			if w != nil && w.late {
				w.late = false
				s.late--
				s.owed = true
			}
			if st != nil && !st.isLive {
				st.isLive = true
				select {
				case <-st.confirmed:
				default:
					close(st.confirmed)
				}
				s.down--
			}
			if s != nil && s.due() {
				lossFor = s
			}
			q.mu.Unlock()
			if down {
				q.log.Info("Redis subscriber connection back; resyncing")
				down = false
			}
			if lossFor != nil && lossFor.onLoss != nil {
				lossFor.onLoss()
			}
		}
	}
}

// Routes reports whether Config.RouteByKey is set (see esq.Interest).
func (q *Queue) Routes() bool { return q.cfg.RouteByKey }

// Watch subscribes to the key's channel, on the entity type's subscription
// (Subscribe must have returned), and returns once Redis confirmed it.
// Watches of one key are counted: the first subscribes, later ones wait for
// its confirmation. When it does not come within LiveTimeout (the
// connection is down, or Redis is slow), the channel stays subscribed, and
// the entity type's onLoss is called once Redis confirmed it, on this
// connection or after a reconnect: once for all the channels of the entity
// type whose Watch gave up meanwhile, not once per key.
func (q *Queue) Watch(key shared.EntityKey) error {
	if !q.cfg.RouteByKey {
		return errors.New("redisq: Watch needs Config.RouteByKey")
	}
	base, err := Channel(q.cfg.ChannelPrefix, key.Entity)
	if err != nil {
		return err
	}
	channel := keyChannel(base, esq.RouteToken(key.ID))
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return esq.ErrClosed
	}
	s := q.subs[base]
	subscribed := s != nil
	if subscribed {
		select {
		case <-s.confirmed:
		default:
			subscribed = false
		}
	}
	if !subscribed {
		q.mu.Unlock()
		return fmt.Errorf("redisq: watch %s: entity type %q is not subscribed", key, key.Entity)
	}
	r, first := q.watches.Watch(channel, func() *watch {
		s.down++
		return &watch{s: s, channelState: channelState{confirmed: make(chan struct{})}}
	})
	w := r.State
	ps := q.ps
	q.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), q.cfg.LiveTimeout)
	defer cancel()
	if first {
		err = ps.Subscribe(ctx, channel)
	}
	if err == nil {
		select {
		case <-w.confirmed:
			return nil
		case <-q.closing:
			return esq.ErrClosed
		case <-ctx.Done():
			err = fmt.Errorf("no confirmation within %s", q.cfg.LiveTimeout)
		}
	}
	q.mu.Lock()
	if !w.isLive && !w.late && r.Watched() {
		w.late = true
		s.late++
	}
	q.mu.Unlock()
	return fmt.Errorf("redisq: watch channel %q on %s (it stays subscribed; onLoss follows its confirmation): %w", channel, q.cfg.Addr, err)
}

// Unwatch undoes one Watch; the last one unsubscribes from the key's
// channel (without waiting for Redis's reply).
func (q *Queue) Unwatch(key shared.EntityKey) {
	base, err := Channel(q.cfg.ChannelPrefix, key.Entity)
	if err != nil {
		return
	}
	channel := keyChannel(base, esq.RouteToken(key.ID))
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return
	}
	r := q.watches.Unwatch(channel)
	if r == nil { // not the last
		q.mu.Unlock()
		return
	}
	w := r.State
	var lossFor *subscription
	if !w.isLive {
		// The one channel a resync may have been waiting for.
		w.s.down--
		if w.late {
			w.s.late--
		}
		if w.s.due() {
			lossFor = w.s
		}
	}
	ps := q.ps
	q.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), q.cfg.LiveTimeout)
	_ = ps.Unsubscribe(ctx, channel) // a failure drops the connection: it comes back without the channel
	cancel()
	if lossFor != nil && lossFor.onLoss != nil {
		lossFor.onLoss()
	}
}

// ping pings the subscriber connection every PingInterval, so that read
// sees a reply at least that often on a live connection.
func (q *Queue) ping(ps *redis.PubSub, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(q.cfg.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-q.closing:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), q.cfg.PingInterval)
		_ = ps.Ping(ctx) // a failure is read's to notice
		cancel()
	}
}

// Close closes the connections and waits, or until ctx ends, for the
// subscriber goroutine (and so every callback) to return.
func (q *Queue) Close(ctx context.Context) error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil
	}
	q.closed = true
	close(q.closing)
	ps, readerDone, pingerDone := q.ps, q.readerDone, q.pingerDone
	q.mu.Unlock()
	var errs []error
	if ps != nil {
		if err := ps.Close(); err != nil {
			errs = append(errs, err)
		}
		for _, done := range []chan struct{}{readerDone, pingerDone} {
			select {
			case <-done:
			case <-ctx.Done():
				return fmt.Errorf("redisq: close: subscriber did not stop: %w", ctx.Err())
			}
		}
	}
	if err := q.client.Close(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("redisq: close: %w", err)
	}
	return nil
}
