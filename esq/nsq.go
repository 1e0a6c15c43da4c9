package esq

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/shared"
)

// NSQConfig configures the NSQ queue. Zero values take the defaults documented
// on each field; NewNSQ validates the whole struct once.
type NSQConfig struct {
	// NSQDAddrs are nsqd TCP addresses ("127.0.0.1:4150"). At least one is
	// required: Publish sends to the first that accepts the message. Without
	// LookupdHTTPAddrs, every server also consumes from each of them.
	NSQDAddrs []string
	// LookupdHTTPAddrs are nsqlookupd HTTP addresses ("127.0.0.1:4161"). When
	// set, consumers discover every nsqd holding a topic through them instead
	// of connecting to NSQDAddrs.
	LookupdHTTPAddrs []string
	// TopicPrefix is put before every entity type to make its topic name, so
	// several applications can share one NSQ cluster. The whole topic name
	// must match ^[.a-zA-Z0-9_-]+$ and be at most 64 characters.
	TopicPrefix string
	// MaxInFlight is how many messages nsqd may send this server before it
	// acknowledges them. Default 64. nsqd's output buffering is always
	// disabled, so a value above 1 adds no latency; acknowledgements go in
	// batches of up to half of it (or 10ms after the first).
	MaxInFlight int
	// ReconnectInterval is how long a consumer waits between attempts to
	// reach a lost nsqd, and how often it polls nsqlookupd. Default 5s
	// (go-nsq's default of 60s would leave a server deaf for a minute after
	// nsqd restarts). Between 10ms and 5m (go-nsq's bounds, kept), and at
	// least twice WatchInterval.
	ReconnectInterval time.Duration
	// WatchInterval is how often each consumer's connection count is checked
	// to detect a lost and regained nsqd. Default 100ms. Negative durations
	// and counts are refused by NewNSQ.
	WatchInterval time.Duration
	// LiveTimeout bounds how long Subscribe waits for the subscription to be
	// live on every nsqd (and how long a resync waits after a reconnect).
	// Default 10s.
	LiveTimeout time.Duration
	// Logger receives this package's log lines. Default: logrus's
	// standard logger.
	Logger logrus.FieldLogger
}

const (
	defaultMaxInFlight       = 64
	defaultReconnectInterval = 5 * time.Second
	defaultWatchInterval     = 100 * time.Millisecond
	defaultLiveTimeout       = 10 * time.Second
	probeRetryInterval       = 50 * time.Millisecond
	minReconnectInterval     = 10 * time.Millisecond // go-nsq's LookupdPollInterval bounds, kept
	maxReconnectInterval     = 5 * time.Minute
	maxTopicLength           = 64
)

// topicChars reports whether s is made of the characters NSQ allows in a
// topic name, [.a-zA-Z0-9_-]: a loop rather than a regular expression, as
// every publish checks its topic.
func topicChars(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// TopicName returns the NSQ topic for an entity type under prefix, or an error
// naming the rule it breaks.
func TopicName(prefix string, entity shared.EntityType) (string, error) {
	topic := prefix + entity.GetQueueName()
	if len(topic) == 0 || len(topic) > maxTopicLength || !topicChars(topic) {
		return "", fmt.Errorf("esq: entity type %q gives NSQ topic %q, which is not valid: NSQ topics are 1 to %d characters from [.a-zA-Z0-9_-], prefix included",
			entity, topic, maxTopicLength)
	}
	return topic, nil
}

// setDefaults fills in the defaults and validates the whole configuration,
// once, so that a bad value is a clear error from NewNSQ rather than a
// failure later on a goroutine (a negative WatchInterval used to panic in
// the first Subscribe's watcher). Negative values are refused explicitly:
// zero means "default", but a negative one is a mistake, not a wish for the
// default.
func (c *NSQConfig) setDefaults() error {
	if len(c.NSQDAddrs) == 0 {
		return errors.New("esq: NSQConfig.NSQDAddrs needs at least one nsqd TCP address to publish to")
	}
	for i, a := range c.NSQDAddrs {
		if strings.TrimSpace(a) == "" {
			return fmt.Errorf("esq: NSQConfig.NSQDAddrs[%d] is empty", i)
		}
	}
	for i, a := range c.LookupdHTTPAddrs {
		if strings.TrimSpace(a) == "" {
			return fmt.Errorf("esq: NSQConfig.LookupdHTTPAddrs[%d] is empty", i)
		}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"ReconnectInterval", c.ReconnectInterval},
		{"WatchInterval", c.WatchInterval},
		{"LiveTimeout", c.LiveTimeout},
	} {
		if d.v < 0 {
			return fmt.Errorf("esq: NSQConfig.%s is %s, must not be negative (0 means the default)", d.name, d.v)
		}
	}
	if c.MaxInFlight < 0 {
		return fmt.Errorf("esq: NSQConfig.MaxInFlight is %d, must not be negative (0 means the default)", c.MaxInFlight)
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = defaultMaxInFlight
	}
	if c.ReconnectInterval == 0 {
		c.ReconnectInterval = defaultReconnectInterval
	}
	if c.WatchInterval == 0 {
		c.WatchInterval = defaultWatchInterval
	}
	if c.LiveTimeout == 0 {
		c.LiveTimeout = defaultLiveTimeout
	}
	// go-nsq's bounds for its LookupdPollInterval, which ReconnectInterval
	// was before the consumers were our own: configurations valid then are
	// valid now, and no other.
	if c.ReconnectInterval < minReconnectInterval || c.ReconnectInterval > maxReconnectInterval {
		return fmt.Errorf("esq: NSQConfig.ReconnectInterval is %s, must be between %s and %s",
			c.ReconnectInterval, minReconnectInterval, maxReconnectInterval)
	}
	if c.ReconnectInterval < 2*c.WatchInterval {
		return fmt.Errorf("esq: NSQConfig.ReconnectInterval (%s) must be at least twice WatchInterval (%s), or a reconnect could go unnoticed",
			c.ReconnectInterval, c.WatchInterval)
	}
	if c.Logger == nil {
		c.Logger = logrus.StandardLogger()
	}
	if c.TopicPrefix != "" && !topicChars(c.TopicPrefix) {
		return fmt.Errorf("esq: NSQConfig.TopicPrefix %q has characters NSQ does not allow in topic names ([.a-zA-Z0-9_-])", c.TopicPrefix)
	}
	return nil
}

// NSQ is a Queue over NSQ. Each NSQ value consumes on its own ephemeral channel,
// so every server receives every message (a shared channel name would load
// balance between servers instead). Ephemeral channels keep nothing when the
// server is gone; a server that loses its nsqd connection re-fetches its
// subscribed keys once the connection is back (see Subscribe's onLoss).
type NSQ struct {
	cfg     NSQConfig
	log     logrus.FieldLogger
	channel string
	http    *http.Client

	mu        sync.Mutex
	producers map[string]*producer // by nsqd TCP address
	subs      map[shared.EntityType]*nsqSubscription
	closed    bool
	closing   chan struct{}
	watchers  sync.WaitGroup
}

type nsqSubscription struct {
	topic     string
	consumer  *nsqConsumer
	onMessage func([]byte)
	onLoss    func()

	probeMu sync.Mutex
	probes  map[string]chan struct{}
}

// NewNSQ validates cfg and returns a queue ready to publish. Connections to
// nsqd are made lazily on the first Publish and by Subscribe.
func NewNSQ(cfg NSQConfig) (*NSQ, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	id, err := randomHex(8)
	if err != nil {
		return nil, err
	}
	return &NSQ{
		cfg:       cfg,
		log:       cfg.Logger.WithField("component", "esq.nsq"),
		channel:   "es-" + id + "#ephemeral",
		http:      &http.Client{Timeout: 5 * time.Second},
		producers: make(map[string]*producer),
		subs:      make(map[shared.EntityType]*nsqSubscription),
		closing:   make(chan struct{}),
	}, nil
}

// Channel returns the ephemeral channel name this server consumes on.
func (q *NSQ) Channel() string { return q.channel }

// producer returns the (cached) producer for an nsqd TCP address.
func (q *NSQ) producer(addr string) (*producer, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil, ErrClosed
	}
	p, ok := q.producers[addr]
	if !ok {
		p = newProducer(addr, q.log.WithField("nsqd", addr))
		q.producers[addr] = p
	}
	return p, nil
}

// Publish sends body to the entity type's topic on the first nsqd in
// NSQDAddrs that accepts it, and returns once nsqd has acknowledged it.
//
// An nsqd that is being dialed by another publish, whose last dial failed,
// or that does not complete a connection (dial and IDENTIFY) within 1s
// is passed over for the next one; only when every nsqd failed does Publish
// come back to the passed-over ones and wait for their connection. It gives
// up when ctx ends, returning an error that wraps ctx.Err(); a message
// already written to nsqd by then may still be published.
func (q *NSQ) Publish(ctx context.Context, entity shared.EntityType, body []byte) error {
	topic, err := TopicName(q.cfg.TopicPrefix, entity)
	if err != nil {
		return err
	}
	ctxErr := func() error { return fmt.Errorf("esq: publish to topic %q: %w", topic, ctx.Err()) }
	if ctx.Err() != nil {
		return ctxErr()
	}
	var errs []error
	var passedOver []*producer
	for _, addr := range q.cfg.NSQDAddrs {
		p, err := q.producer(addr)
		if err != nil {
			return err
		}
		err = p.publish(ctx, topic, body, false)
		var skip *skipped
		switch {
		case err == nil:
			return nil
		case ctx.Err() != nil:
			return ctxErr()
		case errors.Is(err, ErrClosed):
			return err
		case errors.As(err, &skip):
			passedOver = append(passedOver, p)
		default:
			errs = append(errs, fmt.Errorf("nsqd %s: %w", addr, err))
		}
	}
	// Every nsqd failed or was passed over: wait for whichever passed-over
	// nsqd connects first (one of them may be a dial that hangs).
	for len(passedOver) > 0 {
		p, err := firstConnected(ctx, passedOver)
		if p == nil {
			if ctx.Err() != nil {
				return ctxErr()
			}
			if errors.Is(err, ErrClosed) {
				return err
			}
			errs = append(errs, err)
			break
		}
		err = p.publish(ctx, topic, body, true)
		switch {
		case err == nil:
			return nil
		case ctx.Err() != nil:
			return ctxErr()
		case errors.Is(err, ErrClosed):
			return err
		}
		errs = append(errs, fmt.Errorf("nsqd %s: %w", p.addr, err))
		passedOver = slices.DeleteFunc(passedOver, func(x *producer) bool { return x == p })
	}
	return fmt.Errorf("esq: publish to topic %q failed on every nsqd: %w", topic, errors.Join(errs...))
}

// firstConnected waits until one of ps has a connection (dialing where
// none is in flight) and returns it, or nil and every dial's error.
func firstConnected(ctx context.Context, ps []*producer) (*producer, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		p   *producer
		err error
	}
	results := make(chan result, len(ps))
	for _, p := range ps {
		go func() {
			_, err := p.conn(ctx, true)
			results <- result{p, err}
		}()
	}
	var errs []error
	for range ps {
		r := <-results
		if r.err == nil {
			return r.p, nil // the others end with the cancelled ctx
		}
		errs = append(errs, fmt.Errorf("nsqd %s: %w", r.p.addr, r.err))
	}
	return nil, errors.Join(errs...)
}

// Subscribe consumes the entity type's topic on this server's ephemeral
// channel and returns once a probe message published through each nsqd has
// come back, which proves the subscription is live on every nsqd holding
// the topic (with nsqlookupd, the consumer may not have found them all yet).
// Probes are ignored by every other server.
func (q *NSQ) Subscribe(entity shared.EntityType, onMessage func([]byte), onLoss func()) error {
	topic, err := TopicName(q.cfg.TopicPrefix, entity)
	if err != nil {
		return err
	}
	s := &nsqSubscription{topic: topic, onMessage: onMessage, onLoss: onLoss,
		probes: make(map[string]chan struct{})}
	s.consumer = newNSQConsumer(topic, q.channel, q.cfg.MaxInFlight, q.cfg.ReconnectInterval,
		func() ([]string, error) { return q.targets(s) }, s.handle, q.log.WithField("topic", topic))

	q.mu.Lock()
	var refused error
	if q.closed {
		refused = ErrClosed
	} else if _, ok := q.subs[entity]; ok {
		refused = ErrAlreadySubscribed
	} else {
		q.subs[entity] = s
	}
	q.mu.Unlock()
	if refused != nil {
		return refused // the consumer has not started anything yet
	}

	if err := q.connect(s); err != nil {
		q.mu.Lock()
		delete(q.subs, entity)
		q.mu.Unlock()
		s.consumer.stop()
		return err
	}
	q.watchers.Add(1)
	go q.watch(s)
	return nil
}

func (q *NSQ) connect(s *nsqSubscription) error {
	if len(q.cfg.LookupdHTTPAddrs) == 0 {
		if err := s.consumer.start(true); err != nil {
			return fmt.Errorf("esq: connect to nsqd for topic %q: %w", s.topic, err)
		}
		return q.waitLive(s)
	}
	// Make sure the topic exists on the nsqd we publish to, and that
	// nsqlookupd knows it, before the consumer asks nsqlookupd where it is.
	if err := q.ensureTopic(s); err != nil {
		return err
	}
	if err := s.consumer.start(false); err != nil {
		return fmt.Errorf("esq: connect to the nsqd nsqlookupd lists for topic %q: %w", s.topic, err)
	}
	q.redialConfigured(s) // from now on the watcher keeps these connected
	return q.waitLive(s)
}

// ensureTopic creates the topic on the first nsqd by publishing a probe to it,
// then waits until nsqlookupd lists at least one nsqd for the topic.
func (q *NSQ) ensureTopic(s *nsqSubscription) error {
	body, _, err := newProbe()
	if err != nil {
		return err
	}
	p, err := q.producer(q.cfg.NSQDAddrs[0])
	if err != nil {
		return err
	}
	ctx, cancel := q.boundedCtx(q.cfg.LiveTimeout)
	err = p.publish(ctx, s.topic, body, true)
	cancel()
	if err != nil {
		if q.isClosing() {
			return ErrClosed
		}
		return fmt.Errorf("esq: create topic %q on nsqd %s: %w", s.topic, q.cfg.NSQDAddrs[0], err)
	}
	deadline := time.Now().Add(q.cfg.LiveTimeout)
	for {
		addrs, err := q.lookup(s.topic)
		if err == nil && len(addrs) > 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("esq: nsqlookupd did not list topic %q within %s (last error: %v)", s.topic, q.cfg.LiveTimeout, err)
		}
		select {
		case <-q.closing:
			return ErrClosed
		case <-time.After(probeRetryInterval):
		}
	}
}

// lookup asks each nsqlookupd which nsqd hold topic and returns their TCP
// addresses.
func (q *NSQ) lookup(topic string) ([]string, error) {
	seen := make(map[string]bool)
	var out []string
	var lastErr error
	for _, lookupd := range q.cfg.LookupdHTTPAddrs {
		base := lookupd
		if !strings.Contains(base, "://") {
			base = "http://" + base
		}
		resp, err := q.http.Get(base + "/lookup?topic=" + url.QueryEscape(topic))
		if err != nil {
			lastErr = err
			continue
		}
		var body struct {
			Producers []struct {
				BroadcastAddress string `json:"broadcast_address"`
				TCPPort          int    `json:"tcp_port"`
			} `json:"producers"`
		}
		err = json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusNotFound {
			continue // topic not registered yet
		}
		if err != nil {
			lastErr = fmt.Errorf("nsqlookupd %s: %w", lookupd, err)
			continue
		}
		for _, p := range body.Producers {
			addr := p.BroadcastAddress + ":" + strconv.Itoa(p.TCPPort)
			if !seen[addr] {
				seen[addr] = true
				out = append(out, addr)
			}
		}
	}
	return out, lastErr
}

// targets returns the nsqd addresses the subscription consumes from.
func (q *NSQ) targets(s *nsqSubscription) ([]string, error) {
	if len(q.cfg.LookupdHTTPAddrs) == 0 {
		return q.cfg.NSQDAddrs, nil
	}
	return q.lookup(s.topic)
}

// waitLive publishes a probe through every nsqd the subscription consumes
// from, repeating until it arrives on this server's channel or LiveTimeout
// passes.
func (q *NSQ) waitLive(s *nsqSubscription) error {
	addrs, err := q.targets(s)
	if err != nil && len(addrs) == 0 {
		return fmt.Errorf("esq: find nsqd for topic %q: %w", s.topic, err)
	}
	deadline := time.Now().Add(q.cfg.LiveTimeout)
	for _, addr := range addrs {
		if err := q.probe(s, addr, deadline); err != nil {
			return err
		}
	}
	return nil
}

func (q *NSQ) probe(s *nsqSubscription, addr string, deadline time.Time) error {
	body, token, err := newProbe()
	if err != nil {
		return err
	}
	arrived := make(chan struct{})
	s.probeMu.Lock()
	s.probes[token] = arrived
	s.probeMu.Unlock()
	defer func() {
		s.probeMu.Lock()
		delete(s.probes, token)
		s.probeMu.Unlock()
	}()
	p, err := q.producer(addr)
	if err != nil {
		return err
	}
	ctx, cancel := q.boundedCtx(time.Until(deadline))
	defer cancel()
	var lastErr error
	for {
		if err := p.publish(ctx, s.topic, body, true); err != nil {
			lastErr = err
		}
		select {
		case <-arrived:
			return nil
		case <-q.closing:
			return ErrClosed
		case <-time.After(probeRetryInterval):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("esq: subscription to topic %q on nsqd %s not live after %s (last publish error: %v)",
				s.topic, addr, q.cfg.LiveTimeout, lastErr)
		}
	}
}

// boundedCtx returns a context that ends after d or when the queue closes,
// for the queue's own publishes (topic creation, probes).
func (q *NSQ) boundedCtx(d time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	go func() {
		select {
		case <-q.closing:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

func (q *NSQ) isClosing() bool {
	select {
	case <-q.closing:
		return true
	default:
		return false
	}
}

// watch detects a lost and regained nsqd connection (the consumer redials on
// its own but says nothing), waits until the subscription is live again and then
// reports the possible loss.
func (q *NSQ) watch(s *nsqSubscription) {
	defer q.watchers.Done()
	ticker := time.NewTicker(q.cfg.WatchInterval)
	defer ticker.Stop()
	last, lastCloses := s.consumer.connections(), s.consumer.closes.Load()
	for {
		select {
		case <-q.closing:
			return
		case <-ticker.C:
		}
		// A redial can lose and regain a connection between two ticks, so
		// it counts as regained whatever the count says.
		regained := len(q.cfg.LookupdHTTPAddrs) > 0 && q.redialConfigured(s)
		n, closes := s.consumer.connections(), s.consumer.closes.Load()
		// Lost and regained since the last tick: the count is back where
		// it was, but the consumer counted a connection closed.
		if closes != lastCloses && n >= last && n > 0 {
			regained = true
		}
		lastCloses = closes
		switch {
		case n < last && !regained:
			q.log.WithField("topic", s.topic).Warnf("lost an nsqd connection (%d left); changes published meanwhile will be recovered by a resync", n)
		case n > last || regained:
			if err := q.waitLive(s); err != nil {
				if errors.Is(err, ErrClosed) {
					return
				}
				q.log.WithField("topic", s.topic).WithError(err).Error("nsqd connection regained but subscription not confirmed; resyncing anyway")
			}
			if s.onLoss != nil {
				s.onLoss()
			}
		}
		last = n
	}
}

// redialConfigured connects the consumer to each of NSQDAddrs it is not
// connected to. With nsqlookupd, the consumer reconnects to a lost nsqd only
// once nsqlookupd lists it again: an nsqd that restarts while nsqlookupd is
// unreachable would stay unheard for as long (the soak run saw 30 s). The
// configured nsqds are known without nsqlookupd, so they are dialled
// directly, every tick of the watcher. It reports whether it made a
// connection.
func (q *NSQ) redialConfigured(s *nsqSubscription) (regained bool) {
	for _, addr := range q.cfg.NSQDAddrs {
		err := s.consumer.connect(addr)
		if err == nil {
			regained = true
		}
		if err != nil && !errors.Is(err, errAlreadyConnected) && !q.isClosing() {
			q.log.WithField("topic", s.topic).WithError(err).Debugf("nsqd %s still unreachable", addr)
		}
	}
	return regained
}

// probeMessage is the body of a liveness probe. Real notifications are keys
// and never carry a "probe" field.
type probeMessage struct {
	Probe string `json:"probe"`
}

var probePrefix = []byte(`{"probe":`)

func newProbe() (body []byte, token string, err error) {
	token, err = randomHex(12)
	if err != nil {
		return nil, "", err
	}
	body, err = json.Marshal(probeMessage{Probe: token})
	return body, token, err
}

// handle is the consumer's handler, called on a connection's reading
// goroutine: it answers the queue's own probes and passes every other
// message on.
func (s *nsqSubscription) handle(body []byte) {
	if bytes.HasPrefix(body, probePrefix) {
		var p probeMessage
		if json.Unmarshal(body, &p) == nil {
			s.probeMu.Lock()
			if ch, ok := s.probes[p.Probe]; ok {
				close(ch)
				delete(s.probes, p.Probe)
			}
			s.probeMu.Unlock()
		}
		return
	}
	s.onMessage(body)
}

// Live returns nil while every subscription holds at least one nsqd
// connection. A subscription with none hears nothing (its consumer redials every
// ReconnectInterval; the watcher resyncs once a connection is back).
// Losing one of several nsqd connections is not reported here: the others
// still carry what is published to them, the watcher logs the loss, and the
// resync follows the reconnect.
func (q *NSQ) Live() error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return ErrClosed
	}
	subs := make([]*nsqSubscription, 0, len(q.subs))
	for _, s := range q.subs {
		subs = append(subs, s)
	}
	q.mu.Unlock()
	var deaf []string
	for _, s := range subs {
		if s.consumer.connections() == 0 {
			deaf = append(deaf, s.topic)
		}
	}
	if len(deaf) > 0 {
		slices.Sort(deaf)
		return fmt.Errorf("esq: no nsqd connection for topic %s: reconnecting every %s", strings.Join(deaf, ", "), q.cfg.ReconnectInterval)
	}
	return nil
}

// Close stops every consumer and producer and waits for them, or for ctx.
func (q *NSQ) Close(ctx context.Context) error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil
	}
	q.closed = true
	close(q.closing)
	subs := q.subs
	producers := q.producers
	q.subs = nil
	q.producers = nil
	q.mu.Unlock()

	for _, s := range subs {
		go s.consumer.stop()
	}
	for _, s := range subs {
		select {
		case <-s.consumer.done:
		case <-ctx.Done():
			return fmt.Errorf("esq: close: consumer for %q did not stop: %w", s.topic, ctx.Err())
		}
	}
	for _, p := range producers {
		p.Stop(ctx)
	}
	q.http.CloseIdleConnections()
	done := make(chan struct{})
	go func() { q.watchers.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("esq: close: watchers did not stop: %w", ctx.Err())
	}
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("esq: random id: %w", err)
	}
	return hex.EncodeToString(b), nil
}
