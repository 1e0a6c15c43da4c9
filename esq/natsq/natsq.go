// Package natsq is an esq.Queue over core NATS publish/subscribe
// (github.com/nats-io/nats.go, imported only here).
//
// Each entity type is one subject, SubjectPrefix + entity type. Every Queue
// subscribes with a plain subscription, never a queue group, so every server
// receives every message. NATS core delivers at most once and keeps nothing:
// a message published while a server is disconnected, or dropped because the
// server fell behind, is gone. Both are reported through Subscribe's onLoss,
// so the bridge re-fetches its subscribed keys:
//
//   - a reconnect: once nats.go has reconnected and the server has the
//     subscriptions again (a flush round trip), onLoss is called for every
//     subscription;
//   - a slow consumer: when a subscription's pending buffer overflows,
//     nats.go drops messages and reports it; onLoss is called for that
//     subscription. (A server that cuts off a slow client causes a
//     reconnect.)
//
// With Config.RouteByKey, a server receives only the keys its clients
// watch (esq.Interest): a notification of one key (or of up to
// esq.MaxRoutedKeys) goes on the key's own subject, the entity type's
// subject plus ".k." and esq.RouteToken(id), and the bridge subscribes to
// that subject from the key's first local subscriber to its last. Every
// server still subscribes to the entity type's subject, which carries
// larger batches and whatever other producers publish there. All of an
// entity type's key subscriptions feed one goroutine through a channel of
// PendingMsgs messages; a full channel is a slow consumer, as above.
//
// Use with entitysync:
//
//	q, err := natsq.New(ctx, natsq.Config{URL: "nats://127.0.0.1:4222", SubjectPrefix: "myapp.es."})
//	if err != nil { ... }
//	e, err := entitysync.New(entitysync.Config{Queue: q})
package natsq

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esq/internal/watches"
	"github.com/entity-sync/entity-sync/shared"
)

// MaxSubjectLength is the longest subject (prefix included) this package
// publishes to. NATS servers refuse a protocol line longer than their
// max_control_line (4 KiB by default) by closing the connection; the limit
// keeps a bad entity type from doing that. With RouteByKey, a key's subject
// adds 19 bytes to its entity type's (".k." and the token).
const MaxSubjectLength = 512

// Config configures a Queue. Only URL is commonly set.
type Config struct {
	// URL is the NATS server URL, or several separated by commas
	// ("nats://127.0.0.1:4222"). Default nats.DefaultURL.
	URL string
	// SubjectPrefix is put before every entity type to make its subject
	// ("myapp.es." gives "myapp.es.items"), so several applications can
	// share one NATS server. It may not contain whitespace or the wildcards
	// '*' and '>'.
	SubjectPrefix string
	// Name is the connection name the server shows. Default "entity-sync".
	Name string
	// ReconnectWait is how long nats.go waits between reconnect attempts to
	// the same server. Default 2s (nats.go's). Reconnects never stop.
	ReconnectWait time.Duration
	// ReconnectBufSize is how many bytes Publish buffers while the
	// connection is being re-established; they are sent on reconnect. -1
	// makes Publish fail while disconnected instead. Default 8 MiB
	// (nats.go's).
	ReconnectBufSize int
	// PendingMsgs and PendingBytes bound what a subscription holds for its
	// callback; past them nats.go drops messages and onLoss is called.
	// Defaults: nats.go's (500,000 messages, 64 MiB).
	PendingMsgs, PendingBytes int
	// PingInterval is how often nats.go pings the server; after two pings
	// without a reply the connection is taken as dead (a peer gone without a
	// reset) and replaced, which calls onLoss as any reconnect does.
	// Default 20s (nats.go's own default is 2 minutes).
	PingInterval time.Duration
	// LiveTimeout bounds the round trip that confirms a subscription, in
	// Subscribe and after a reconnect. Default 10s.
	LiveTimeout time.Duration
	// Options are further nats.go options (credentials, TLS, ...). They are
	// applied first: this package's own handlers and reconnect settings
	// win.
	Options []nats.Option
	// Logger receives connection events. Default: logrus's standard logger.
	Logger logrus.FieldLogger
	// RouteByKey makes the queue route each key's notifications to the
	// servers that watch it (see the package comment) instead of
	// broadcasting them. Set it on every server of a cluster or on none: a
	// server that broadcasts does not hear what a routing one publishes on
	// key subjects. Loss detection (esq.DetectLoss) does not apply to a
	// routing queue; this package's own (reconnect, slow consumer) does.
	RouteByKey bool
}

// Queue is an esq.Queue over one NATS connection.
type Queue struct {
	cfg    Config
	log    logrus.FieldLogger
	nc     *nats.Conn
	closed chan struct{} // closed by nats.go's ClosedHandler

	// subscribeKey is nc.ChanSubscribe; a test makes it refuse.
	subscribeKey func(subject string, ch chan *nats.Msg) (*nats.Subscription, error)
	// subscribed numbers the key subscriptions nats.go took, in order: a
	// flush started once n was drawn confirms subscription n.
	subscribed atomic.Uint64

	mu       sync.RWMutex
	isClosed bool
	subs     map[string]*subscription // by subject
	watches  watches.Set[*watch]      // by key subject, with RouteByKey
	// running counts callbacks and reconnect confirmations at work. Add
	// happens under mu's read lock while the queue is open, so every Add
	// happens before Close's Wait.
	running sync.WaitGroup
}

type subscription struct {
	subject   string
	onMessage func([]byte)
	onLoss    func()
	sub       *nats.Subscription
	// keyMsgs receives the messages of the entity type's key subjects
	// (RouteByKey), which one goroutine hands to onMessage.
	keyMsgs chan *nats.Msg
	// late is the highest number (Queue.subscribed) of a key subscription
	// whose Watch gave up waiting for its flush and that no onLoss has
	// covered since, 0 for none; confirming is set while confirmLate runs
	// for s. Under Queue.mu. However many Watches give up in one outage,
	// one onLoss covers them.
	late       uint64
	confirming bool
}

// watch is one key subject subscribed for Watch (package watches counts
// them).
type watch struct {
	s   *subscription
	sub *nats.Subscription // nil until subscribed, and after a refusal
	try *watchTry          // the latest attempt to subscribe
}

// watchTry is one attempt to subscribe to a key subject, which the Watch
// calls that arrive while it runs wait for.
type watchTry struct {
	ready   chan struct{} // closed once the attempt's flush returned
	err     error         // its error, set before ready is closed
	refused bool          // nats.go refused the subscription: the next Watch tries again
}

var (
	_ esq.Queue    = (*Queue)(nil)
	_ esq.Interest = (*Queue)(nil)
	_ esq.KeyQueue = (*Queue)(nil)
)

// New connects to NATS and returns a Queue. ctx bounds the connection
// attempt; it is not kept.
func New(ctx context.Context, cfg Config) (*Queue, error) {
	if cfg.URL == "" {
		cfg.URL = nats.DefaultURL
	}
	if cfg.Name == "" {
		cfg.Name = "entity-sync"
	}
	if cfg.ReconnectWait == 0 {
		cfg.ReconnectWait = nats.DefaultReconnectWait
	}
	if cfg.ReconnectWait < 0 {
		return nil, fmt.Errorf("natsq: Config.ReconnectWait is %s, must not be negative", cfg.ReconnectWait)
	}
	if cfg.ReconnectBufSize == 0 {
		cfg.ReconnectBufSize = nats.DefaultReconnectBufSize
	}
	if cfg.PendingMsgs == 0 {
		cfg.PendingMsgs = nats.DefaultSubPendingMsgsLimit
	}
	if cfg.PendingBytes == 0 {
		cfg.PendingBytes = nats.DefaultSubPendingBytesLimit
	}
	if cfg.PendingMsgs < 0 || cfg.PendingBytes < 0 {
		return nil, errors.New("natsq: Config.PendingMsgs and PendingBytes must not be negative")
	}
	if cfg.LiveTimeout == 0 {
		cfg.LiveTimeout = 10 * time.Second
	}
	if cfg.PingInterval == 0 {
		cfg.PingInterval = 20 * time.Second
	}
	if cfg.PingInterval < 0 {
		return nil, errors.New("natsq: Config.PingInterval must not be negative")
	}
	if cfg.LiveTimeout < 0 {
		return nil, errors.New("natsq: Config.LiveTimeout must not be negative")
	}
	if cfg.Logger == nil {
		cfg.Logger = logrus.StandardLogger()
	}
	if err := checkSubject(cfg.SubjectPrefix, true); err != nil {
		return nil, fmt.Errorf("natsq: Config.SubjectPrefix %q: %w", cfg.SubjectPrefix, err)
	}
	q := &Queue{
		cfg:    cfg,
		log:    cfg.Logger.WithField("component", "esq.natsq"),
		closed: make(chan struct{}),
		subs:   make(map[string]*subscription),
	}
	opts := append([]nats.Option(nil), cfg.Options...)
	opts = append(opts,
		nats.Name(cfg.Name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(cfg.ReconnectWait),
		nats.ReconnectBufSize(cfg.ReconnectBufSize),
		nats.PingInterval(cfg.PingInterval),
		nats.MaxPingsOutstanding(2),
		nats.DisconnectErrHandler(q.disconnected),
		nats.ReconnectHandler(q.reconnected),
		nats.ErrorHandler(q.asyncError),
		nats.ClosedHandler(func(*nats.Conn) { close(q.closed) }),
	)
	if deadline, ok := ctx.Deadline(); ok {
		opts = append(opts, nats.Timeout(time.Until(deadline)))
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("natsq: connect to %s: %w", cfg.URL, err)
	}
	nc, err := nats.Connect(cfg.URL, opts...)
	if err != nil {
		return nil, fmt.Errorf("natsq: connect to %s: %w", cfg.URL, err)
	}
	q.nc = nc
	q.subscribeKey = nc.ChanSubscribe
	return q, nil
}

// Subject returns the subject for an entity type under prefix, or an error
// naming the rule it breaks.
func Subject(prefix string, entity shared.EntityType) (string, error) {
	if entity == "" {
		return "", errors.New(`natsq: entity type "" is not valid: it must not be empty`)
	}
	subject := prefix + entity.GetQueueName()
	if err := checkSubject(subject, false); err != nil {
		return "", fmt.Errorf("natsq: entity type %q gives NATS subject %q, which is not valid: %w", abbreviate(string(entity)), abbreviate(subject), err)
	}
	return subject, nil
}

func abbreviate(s string) string {
	if len(s) > 80 {
		return fmt.Sprintf("%s...(%d bytes)", s[:60], len(s))
	}
	return s
}

// checkSubject checks a subject, or with prefix set a subject's beginning
// (which may be empty and end with a dot).
func checkSubject(s string, prefix bool) error {
	if len(s) > MaxSubjectLength {
		return fmt.Errorf("longer than %d bytes", MaxSubjectLength)
	}
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c <= ' ' || c == 0x7f:
			return fmt.Errorf("whitespace or control character at byte %d", i)
		case c == '*' || c == '>':
			return fmt.Errorf("wildcard %q at byte %d (subjects are literal here)", c, i)
		}
	}
	tokens := strings.Split(s, ".")
	if prefix {
		if s == "" {
			return nil
		}
		tokens = tokens[:len(tokens)-1] // "a.b." ends with an empty token to come
		if len(tokens) == 0 {
			return nil
		}
	}
	for _, tok := range tokens {
		if tok == "" {
			return errors.New("empty token (a leading, trailing or doubled '.')")
		}
	}
	return nil
}

// enter registers a callback about to run; false once the queue is closed.
func (q *Queue) enter() bool {
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.isClosed {
		return false
	}
	q.running.Add(1)
	return true
}

// Publish sends body on the entity type's subject. It returns once the
// message is in the connection's buffer, which nats.go writes out at once
// (NATS core does not acknowledge publishes). While the connection is being
// re-established, up to ReconnectBufSize bytes are buffered and sent on
// reconnect. A body larger than the server's max_payload is refused.
func (q *Queue) Publish(_ context.Context, entity shared.EntityType, body []byte) error {
	subject, err := q.publishSubject(entity)
	if err != nil {
		return err
	}
	if q.cfg.RouteByKey {
		if routed := esq.RouteByKey(entity, body); routed != nil {
			for _, r := range routed {
				if err := q.publish(keySubject(subject, r.Token), r.Body); err != nil {
					return err
				}
			}
			return nil
		}
	}
	return q.publish(subject, body)
}

// PublishKey publishes key's notification as Publish does the body
// esq.KeyBody(key), which is what subscribers receive. With RouteByKey, it
// goes on the key's own subject without the body being decoded to find
// the key (see esq.KeyQueue).
func (q *Queue) PublishKey(_ context.Context, key shared.EntityKey) error {
	subject, err := q.publishSubject(key.Entity)
	if err != nil {
		return err
	}
	if q.cfg.RouteByKey && key.ID != "" {
		subject = keySubject(subject, esq.RouteToken(key.ID))
	}
	return q.publish(subject, esq.KeyBody(key))
}

// SubscribeKeys is Subscribe: every message reaches onMessage as its
// body, and onKey is not called (see esq.KeyQueue).
func (q *Queue) SubscribeKeys(entity shared.EntityType, onMessage func([]byte), _ func(shared.EntityKey), onLoss func()) error {
	return q.Subscribe(entity, onMessage, onLoss)
}

// KeyQueue returns q (see esq.KeyQueue).
func (q *Queue) KeyQueue() esq.Queue { return q }

// publishSubject returns the entity type's subject, or ErrClosed once the
// queue is closed.
func (q *Queue) publishSubject(entity shared.EntityType) (string, error) {
	q.mu.RLock()
	closed := q.isClosed
	q.mu.RUnlock()
	if closed {
		return "", esq.ErrClosed
	}
	return Subject(q.cfg.SubjectPrefix, entity)
}

// keySubject is the subject of the key whose esq.RouteToken is token.
func keySubject(entitySubject, token string) string { return entitySubject + ".k." + token }

func (q *Queue) publish(subject string, body []byte) error {
	if max := q.nc.MaxPayload(); max > 0 && int64(len(body)) > max {
		return fmt.Errorf("natsq: message of %d bytes on subject %q exceeds the NATS server's max_payload of %d bytes", len(body), subject, max)
	}
	if err := q.nc.Publish(subject, body); err != nil {
		if errors.Is(err, nats.ErrConnectionClosed) {
			return esq.ErrClosed
		}
		return fmt.Errorf("natsq: publish on subject %q: %w", subject, err)
	}
	return nil
}

// Subscribe subscribes to the entity type's subject and returns once the
// NATS server has the subscription (a flush round trip), so a message
// published after it returns is delivered. onMessage is called on one
// goroutine per subscription, in order. onLoss is called after a reconnect,
// once the subscription is live again, and when a slow consumer made
// nats.go drop messages.
func (q *Queue) Subscribe(entity shared.EntityType, onMessage func([]byte), onLoss func()) error {
	subject, err := Subject(q.cfg.SubjectPrefix, entity)
	if err != nil {
		return err
	}
	s := &subscription{subject: subject, onMessage: onMessage, onLoss: onLoss}
	if q.cfg.RouteByKey {
		s.keyMsgs = make(chan *nats.Msg, q.cfg.PendingMsgs)
	}
	q.mu.Lock()
	switch {
	case q.isClosed:
		q.mu.Unlock()
		return esq.ErrClosed
	case q.subs[subject] != nil:
		q.mu.Unlock()
		return esq.ErrAlreadySubscribed
	}
	q.subs[subject] = s // reserved: a concurrent Subscribe to it is refused
	q.mu.Unlock()

	sub, err := q.nc.Subscribe(subject, func(m *nats.Msg) {
		if !q.enter() {
			return
		}
		defer q.running.Done()
		s.onMessage(m.Data)
	})
	if err == nil {
		err = sub.SetPendingLimits(q.cfg.PendingMsgs, q.cfg.PendingBytes)
		if err == nil {
			err = q.nc.FlushTimeout(q.cfg.LiveTimeout)
		}
		if err != nil {
			_ = sub.Unsubscribe()
		}
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if err != nil {
		delete(q.subs, subject)
		if errors.Is(err, nats.ErrConnectionClosed) || q.isClosed {
			return esq.ErrClosed
		}
		return fmt.Errorf("natsq: subscribe to subject %q: %w", subject, err)
	}
	s.sub = sub
	if s.keyMsgs != nil {
		q.running.Add(1) // under mu while open: before Close's Wait
		go q.deliverKeys(s)
	}
	return nil
}

// deliverKeys hands the messages of s's key subjects to onMessage, in the
// order they arrived, until the connection is closed.
func (q *Queue) deliverKeys(s *subscription) {
	defer q.running.Done()
	for {
		select {
		case m := <-s.keyMsgs:
			if !q.enter() {
				return
			}
			s.onMessage(m.Data)
			q.running.Done()
		case <-q.closed:
			return
		}
	}
}

// Routes reports whether Config.RouteByKey is set (see esq.Interest).
func (q *Queue) Routes() bool { return q.cfg.RouteByKey }

// Watch subscribes to the key's subject, on the entity type's subscription
// (Subscribe must have returned), and returns once the NATS server has the
// subscription (a flush round trip). Watches of one key are counted: the
// first subscribes, later ones wait for its flush. When the flush fails
// (the connection is down, or the server is slow), the subscription stays:
// the entity type's onLoss is called once a later flush confirms it, or
// after the reconnect (nats.go sends it again): once for every Watch of
// the entity type that gave up meanwhile, not once per key. When nats.go
// refuses the subscription (its connection is closed or draining), the
// Watch calls waiting on it return the error and still count; the key's
// next Watch subscribes again.
func (q *Queue) Watch(key shared.EntityKey) error {
	if !q.cfg.RouteByKey {
		return errors.New("natsq: Watch needs Config.RouteByKey")
	}
	base, err := Subject(q.cfg.SubjectPrefix, key.Entity)
	if err != nil {
		return err
	}
	subject := keySubject(base, esq.RouteToken(key.ID))
	q.mu.Lock()
	if q.isClosed {
		q.mu.Unlock()
		return esq.ErrClosed
	}
	s := q.subs[base]
	if s == nil || s.sub == nil {
		q.mu.Unlock()
		return fmt.Errorf("natsq: watch %s: entity type %q is not subscribed", key, key.Entity)
	}
	r, _ := q.watches.Watch(subject, func() *watch { return &watch{s: s} })
	w := r.State
	if try := w.try; try != nil && !try.refused {
		q.mu.Unlock()
		<-try.ready
		return try.err
	}
	// The key's first Watch, or the first since nats.go refused one.
	try := &watchTry{ready: make(chan struct{})}
	w.try = try
	q.mu.Unlock()

	sub, err := q.subscribeKey(subject, s.keyMsgs)
	var n uint64
	if err == nil {
		n = q.subscribed.Add(1)
		err = q.nc.FlushTimeout(q.cfg.LiveTimeout)
	}
	q.mu.Lock()
	var drop *nats.Subscription
	switch {
	case sub == nil:
		try.refused = true // the route stays: the callers waiting on try count on it
	case !r.Watched():
		drop = sub // unwatched meanwhile (and out of q.watches)
	default:
		w.sub = sub
	}
	if err != nil {
		if errors.Is(err, nats.ErrConnectionClosed) || q.isClosed {
			err = esq.ErrClosed
		} else {
			err = fmt.Errorf("natsq: watch subject %q (it stays subscribed; onLoss follows its confirmation): %w", subject, err)
			if sub != nil {
				q.lateLocked(s, n)
			}
		}
	}
	try.err = err
	close(try.ready)
	q.mu.Unlock()
	if drop != nil {
		_ = drop.Unsubscribe()
	}
	return err
}

// lateLocked records that the Watch of key subscription n on s gave up
// waiting for its flush, and has confirmLate run for s if it does not
// already. With q.mu held.
func (q *Queue) lateLocked(s *subscription, n uint64) {
	if n > s.late {
		s.late = n
	}
	if !s.confirming {
		s.confirming = true
		q.running.Add(1) // under mu while open: before Close's Wait
		go q.confirmLate(s)
	}
}

// confirmLate calls s's onLoss once a flush confirms the key subscriptions
// whose Watch gave up waiting for its own: whoever watched may have
// fetched without listening yet. One onLoss covers every such
// subscription the flush confirms. A lost connection leaves it to the
// reconnect, whose onLoss covers them too (see reconnected).
func (q *Queue) confirmLate(s *subscription) {
	defer q.running.Done()
	for {
		upTo := q.subscribed.Load()
		err := q.nc.FlushTimeout(q.cfg.LiveTimeout)
		q.mu.Lock()
		switch {
		case err == nil && s.late > upTo:
			// A Watch that subscribed after the flush started gave up
			// too: the next flush confirms both, for one onLoss.
			q.mu.Unlock()
			continue
		case err == nil:
			owed := s.late != 0 // 0: a reconnect's onLoss covered them
			s.late, s.confirming = 0, false
			q.mu.Unlock()
			if owed && s.onLoss != nil && q.enter() {
				s.onLoss()
				q.running.Done()
			}
			return
		case errors.Is(err, nats.ErrConnectionClosed) || !q.nc.IsConnected():
			s.confirming = false
			q.mu.Unlock()
			return
		}
		q.mu.Unlock()
	}
}

// Unwatch undoes one Watch; the last one unsubscribes from the key's
// subject (the UNSUB goes out with the connection's next write, unawaited).
func (q *Queue) Unwatch(key shared.EntityKey) {
	base, err := Subject(q.cfg.SubjectPrefix, key.Entity)
	if err != nil {
		return
	}
	subject := keySubject(base, esq.RouteToken(key.ID))
	q.mu.Lock()
	r := q.watches.Unwatch(subject)
	var sub *nats.Subscription
	if r != nil { // the last
		sub = r.State.sub // nil while a Watch subscribes (it unsubscribes), or after a refusal
	}
	q.mu.Unlock()
	if sub != nil {
		_ = sub.Unsubscribe()
	}
}

// Live returns nil while the connection to NATS is up (nats.go sends the
// subscriptions again on every reconnect), and an error while it is down.
func (q *Queue) Live() error {
	q.mu.RLock()
	closed := q.isClosed
	q.mu.RUnlock()
	if closed {
		return esq.ErrClosed
	}
	if !q.nc.IsConnected() {
		return fmt.Errorf("natsq: not connected to NATS (%s): reconnecting", q.nc.Status())
	}
	return nil
}

func (q *Queue) disconnected(_ *nats.Conn, err error) {
	q.mu.RLock()
	closed := q.isClosed
	q.mu.RUnlock()
	if closed {
		return
	}
	q.log.WithError(err).Warn("disconnected from NATS; reconnecting (changes published meanwhile will be recovered by a resync)")
}

// reconnected runs on nats.go's callback goroutine once the connection is
// back and the subscriptions were sent again. A flush confirms the server
// has them; then every subscription's onLoss is called.
func (q *Queue) reconnected(nc *nats.Conn) {
	q.mu.RLock()
	if q.isClosed {
		q.mu.RUnlock()
		return
	}
	q.running.Add(1)
	subs := make([]*subscription, 0, len(q.subs))
	for _, s := range q.subs {
		subs = append(subs, s)
	}
	q.mu.RUnlock()
	go func() {
		defer q.running.Done()
		upTo := q.subscribed.Load()
		if err := nc.FlushTimeout(q.cfg.LiveTimeout); err != nil {
			// Disconnected again (the next reconnect reports the loss) or
			// closed.
			q.log.WithError(err).Warn("reconnected to NATS but could not confirm the subscriptions; waiting for the next reconnect")
			return
		}
		q.log.WithField("server", nc.ConnectedUrlRedacted()).Infof("reconnected to NATS; resyncing %d subscriptions", len(subs))
		q.mu.Lock()
		for _, s := range subs {
			if s.late <= upTo {
				s.late = 0 // confirmed by the flush: the onLoss below covers them
			}
		}
		q.mu.Unlock()
		for _, s := range subs {
			if s.onLoss != nil && q.enter() {
				s.onLoss()
				q.running.Done()
			}
		}
	}()
}

// asyncError receives nats.go's asynchronous errors; a slow consumer means
// messages were dropped.
func (q *Queue) asyncError(_ *nats.Conn, sub *nats.Subscription, err error) {
	if !errors.Is(err, nats.ErrSlowConsumer) || sub == nil {
		q.log.WithError(err).Warn("NATS error")
		return
	}
	q.mu.RLock()
	s := q.subs[sub.Subject]
	if r := q.watches.Get(sub.Subject); s == nil && r != nil {
		s = r.State.s
	}
	q.mu.RUnlock()
	if s == nil {
		return
	}
	dropped, _ := sub.Dropped()
	q.log.WithField("subject", sub.Subject).Warnf("slow consumer: nats.go dropped %d messages so far (raise Config.PendingMsgs or find what stalls the server); resyncing", dropped)
	if s.onLoss != nil && q.enter() {
		s.onLoss()
		q.running.Done()
	}
}

// MaxPayload returns the largest body the connected server accepts.
func (q *Queue) MaxPayload() int64 { return q.nc.MaxPayload() }

// Close closes the connection and waits, or until ctx ends, for running
// callbacks to return and nats.go to finish closing.
func (q *Queue) Close(ctx context.Context) error {
	q.mu.Lock()
	if q.isClosed {
		q.mu.Unlock()
		return nil
	}
	q.isClosed = true
	q.mu.Unlock()
	q.nc.Close()
	done := make(chan struct{})
	go func() { q.running.Wait(); <-q.closed; close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("natsq: close: %w", ctx.Err())
	}
}
