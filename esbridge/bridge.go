// Package esbridge is the core of entity-sync: it keeps the index of which
// local client subscribes to which key, publishes change notifications to the
// queue, and turns each notification that arrives into one fetch per server
// (per distinct secret for the seed's handlers) whose result is fanned out to
// the key's local subscribers.
//
// Per key, at most one fetch round runs at a time; notifications that arrive
// during a round cause exactly one follow-up round. Rounds are numbered, and a
// client is only ever sent a round newer than the last one it got for the key,
// so pushes for one key never go back in time. A round whose rows equal the
// previous ones sends nothing to clients that already have them.
package esbridge

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

// Fetcher is what the bridge needs from the entity registry;
// *esdb.DatabaseHub implements it.
type Fetcher interface {
	// Fetch returns the key's rows as the holder of secret may see them.
	// Rows go to clients in websocket text frames: each run of invalid
	// UTF-8 bytes in a row is replaced by U+FFFD, and logged once per key.
	Fetch(ctx context.Context, key shared.EntityKey, secret string) ([][]byte, error)
	// PerSecret reports whether the entity's rows depend on the secret. If
	// not, the bridge fetches once per change for all subscribers.
	PerSecret(entity shared.EntityType) bool
}

// Options tunes a Bridge. Zero values take the documented defaults.
type Options struct {
	// Logger receives the bridge's log lines. Default: logrus's standard logger.
	Logger logrus.FieldLogger
	// MaxConcurrentFetches bounds the fetch rounds running at once across all
	// keys (the size of the worker pool), so a resync of many keys cannot
	// flood the database. Default 32.
	MaxConcurrentFetches int
	// FetchTimeout bounds one call to the fetch function. Default 10s.
	FetchTimeout time.Duration
	// RetryDelay is the first wait before re-running a failed fetch; it
	// doubles up to MaxRetryDelay while the fetch keeps failing and the key
	// has subscribers. Defaults 500ms and 30s.
	RetryDelay, MaxRetryDelay time.Duration
	// Authorize decides whether the connection in ctx (see
	// shared.ConnectionFrom: principal, secret, upgrade request) may
	// subscribe to key; an error refuses the subscription (Subscribe
	// returns it wrapped in shared.ErrForbidden), and no byte of
	// the key is ever sent to that client. It runs on subscribe, for every
	// subscription of a client that sets a new secret, and for the keys
	// Reauthorize selects. Default: every subscription is allowed. It must
	// not call back into the bridge or the client.
	Authorize func(ctx context.Context, key shared.EntityKey) error
	// Filter, if set, trims the rows of each change for each client (row
	// level visibility) in memory, without another fetch: it gets the
	// client's context and the fetched rows and returns the rows that client
	// may see. The slice is the filter's own for the call: it may edit it in
	// place (slices.DeleteFunc, rows[:0] and append, replacing an element)
	// and return it or any other slice, and no other client is affected. The
	// rows' bytes are shared by every client and must not be changed (put a
	// redacted copy in the slice instead), and the slice must not be kept
	// after the call. Returning the rows unchanged (the same rows in the
	// same order) keeps the shared, encode-once frame; anything else costs
	// one encoding per client. It runs while the key fans out: keep it fast
	// and pure. A panic sends that client nothing.
	Filter func(ctx context.Context, key shared.EntityKey, rows [][]byte) [][]byte
	// MaxPendingNotifications bounds the keys NotifyAsync holds while they
	// wait to be published. Default 10,000.
	MaxPendingNotifications int
	// OnNotifyError, if set, is told of every failed attempt to publish a
	// notification queued by NotifyAsync (it is retried). Default: a
	// warning in the log.
	OnNotifyError func(key shared.EntityKey, err error)
	// OnRound, if set, is called after each fetch round with what it did
	// and when: for metrics and latency breakdowns. It runs on the round's
	// worker, without locks: keep it fast.
	OnRound func(Round)
	// MaxPendingBytes bounds the bytes of updates waiting to be written to
	// one client. A client that falls that far behind is disconnected
	// (close code 1008) instead of holding more memory. Default 32 MiB.
	MaxPendingBytes int
	// KeptStates is how many earlier states of each collection key (see
	// esdb.DatabaseHub.RegisterCollection) the bridge keeps while the key
	// has subscribers, at most 8 MiB of rows per key: a client that
	// subscribes again holding one of them (after a reconnect) gets the
	// difference instead of every row. Default 4; negative: none (such a
	// client then gets every row, unless it holds the current state).
	KeptStates int
}

// Round is what one fetch round of one key did, for Options.OnRound.
type Round struct {
	Key shared.EntityKey
	// Notified is when the first notification this round answers came
	// from the queue; zero for a round made by a subscribe, a retry or a
	// resync alone.
	Notified time.Time
	// Started is when the round began fetching, Fetched when its fetches
	// returned, Delivered when every member had been handed the result (with
	// direct writes, when the last frame went to the socket or its queue).
	Started, Fetched, Delivered time.Time
	Fetches, FetchErrors        int
	Deliveries                  int // updates handed to clients
}

func (o *Options) setDefaults() {
	if o.Logger == nil {
		o.Logger = logrus.StandardLogger()
	}
	if o.MaxConcurrentFetches <= 0 {
		o.MaxConcurrentFetches = 32
	}
	if o.FetchTimeout <= 0 {
		o.FetchTimeout = 10 * time.Second
	}
	if o.RetryDelay <= 0 {
		o.RetryDelay = 500 * time.Millisecond
	}
	if o.MaxRetryDelay <= 0 {
		o.MaxRetryDelay = 30 * time.Second
	}
	if o.MaxRetryDelay < o.RetryDelay {
		o.MaxRetryDelay = o.RetryDelay
	}
	if o.MaxPendingNotifications <= 0 {
		o.MaxPendingNotifications = 10000
	}
	if o.MaxPendingBytes <= 0 {
		o.MaxPendingBytes = 32 << 20
	}
	if o.KeptStates == 0 {
		o.KeptStates = 4
	}
}

// ErrClosed is returned once the bridge has been closed.
var ErrClosed = errors.New("esbridge: closed")

// ErrEntityNotServed is returned when a client subscribes to an entity type
// the bridge was not told to serve.
var ErrEntityNotServed = errors.New("esbridge: entity type not served")

const shardCount = 64

// Bridge connects the queue, the fetcher and the local clients.
type Bridge struct {
	queue esq.Queue
	// interest is the queue when it routes by key (esq.Routing): a key
	// is watched from its first local subscriber to its last.
	interest esq.Interest
	// keys is the queue when it takes keys as they are (esq.Keys): a
	// notification of one key is not encoded here, nor decoded there.
	keys    esq.KeyQueue
	fetcher Fetcher
	opts    Options
	log     logrus.FieldLogger
	// filterBadUTF8 is set once Options.Filter returned invalid UTF-8 (see
	// validUTF8): logged once, not per client and change.
	filterBadUTF8 atomic.Bool

	seed   maphash.Seed
	shards [shardCount]shard

	ctx    context.Context // cancelled by Close: ends running fetches
	cancel context.CancelFunc

	work     workQueue
	rounds   sync.WaitGroup // the workers
	watchers sync.WaitGroup // the routing queue's Watch calls (startWatch)
	notifier notifier

	life   sync.RWMutex // guards closed and served
	closed bool
	served map[shared.EntityType]bool
	// seq numbers published states across all keys (Update.Seq).
	seq   atomic.Uint64
	stats counters

	clientsMu sync.Mutex
	clients   map[*Client]struct{}
}

// notifier is NotifyAsync's queue (see notify.go).
type notifier struct {
	mu       sync.Mutex
	fifo     []*notifyBatch                    // oldest first: in order of seq
	inFlight *notifyBatch                      // being published
	pending  int                               // keys in fifo or being published
	waiting  map[shared.EntityKey]*notifyBatch // the keys in fifo, and their batch
	seq      uint64                            // the last batch's
	progress chan struct{}                     // closed when a batch is done
	running  bool                              // the publisher goroutine runs
	done     chan struct{}                     // closed when it returns
	closed   bool                              // NotifyAsync refuses
	stopped  bool                              // the publisher gives up (Close's ctx ended)
}

// notifyBatch is keys queued together by NotifyKeysAsync, published
// together. seq numbers the call that queued them: FlushNotifications
// waits for every batch up to the last seq it saw.
type notifyBatch struct {
	keys []shared.EntityKey
	seq  uint64
}

// workQueue is the FIFO of keys waiting for a fetch round, and the pool of
// workers that take them (see rounds.go).
type workQueue struct {
	mu      sync.Mutex
	keys    []*keyState // the FIFO is keys[head:]
	head    int
	workers int // running, at most MaxConcurrentFetches
	busy    int // of which in a round
	idle    int // of which lingering and not woken (see worker)
	wake    chan struct{}
	closed  bool
}

type shard struct {
	mu   sync.Mutex
	keys map[shared.EntityKey]*keyState
}

type counters struct {
	notifications, notifyErrors, received, fetches, fetchErrors, deliveries, resyncs, revocations, overflows atomic.Uint64
	coalesced, resyncedKeys                                                                                  atomic.Uint64
}

// Stats is a snapshot of the bridge's counters since it started.
type Stats struct {
	Notifications uint64 // notifications published (NotifyAllOfChange, NotifyAsync)
	NotifyErrors  uint64 // failed attempts to publish a NotifyAsync notification
	Pending       int    // keys NotifyAsync queued that are not published yet (also the ones being published)
	Received      uint64 // notifications received from the queue
	Fetches       uint64 // calls to the fetch function
	FetchErrors   uint64 // of which failed
	Deliveries    uint64 // updates handed to clients' outbound queues
	Resyncs       uint64 // times every key of an entity type was re-fetched after broker loss
	Revocations   uint64 // subscriptions withdrawn after a failed re-authorization
	Overflows     uint64 // updates dropped for clients over MaxPendingBytes (then disconnected)
	Keys          int    // keys with at least one local subscriber
	Clients       int    // connected clients
	// Subscriptions counts (client, key) pairs in the index, PendingBytes
	// the updates waiting in clients' outbound queues (as MaxPendingBytes
	// counts them). Both are read at the call, which costs a lock per key
	// and per client: for a metrics scrape, not a hot loop.
	Subscriptions int
	PendingBytes  int
	Coalesced     uint64 // pending updates replaced by a newer state of their key before being written (latest-wins)
	ResyncedKeys  uint64 // keys re-fetched by the Resyncs
}

// New returns a bridge that publishes to and receives from queue and looks
// entities up through fetcher. Call ServeEntity for each entity type.
func New(queue esq.Queue, fetcher Fetcher, opts Options) *Bridge {
	opts.setDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	b := &Bridge{
		queue:    queue,
		interest: esq.Routing(queue),
		keys:     esq.Keys(queue),
		fetcher:  fetcher,
		opts:     opts,
		log:      opts.Logger.WithField("component", "esbridge"),
		seed:     maphash.MakeSeed(),
		ctx:      ctx,
		cancel:   cancel,
		served:   make(map[shared.EntityType]bool),
		clients:  make(map[*Client]struct{}),
	}
	for i := range b.shards {
		b.shards[i].keys = make(map[shared.EntityKey]*keyState)
	}
	return b
}

// BuildBridge is the seed's constructor: a publisher builder, a subscriber
// builder and the seed's lookup function (such as
// esdb.DatabaseHub.PullDataAndPush), which is called once per distinct secret
// among a key's subscribers. Call ServeEntity for each entity type.
func BuildBridge(publisher shared.EntityHandler, subscriber shared.EntityByteHandler, pull shared.SecretDBHandler) *Bridge {
	return New(esq.FromBuilders(publisher, subscriber), esdb.SeedLookup(pull), Options{})
}

var _ Fetcher = (*esdb.DatabaseHub)(nil)

// ServeEntity subscribes the bridge to the entity type's notifications. It
// returns once notifications published anywhere reach this server, or with
// the queue's error (an entity type that makes an invalid topic name, an
// unreachable broker).
func (b *Bridge) ServeEntity(entity shared.EntityType) error {
	if entity == "" {
		return errors.New("esbridge: empty entity type")
	}
	b.life.Lock()
	if b.closed {
		b.life.Unlock()
		return ErrClosed
	}
	if b.served[entity] {
		b.life.Unlock()
		return fmt.Errorf("esbridge: entity type %q served twice", entity)
	}
	b.served[entity] = true
	b.life.Unlock()

	onMessage := func(body []byte) { b.receive(entity, body) }
	onLoss := func() { b.resync(entity) }
	var err error
	if b.keys != nil {
		err = b.keys.SubscribeKeys(entity, onMessage, b.receiveKey, onLoss)
	} else {
		err = b.queue.Subscribe(entity, onMessage, onLoss)
	}
	if err != nil {
		b.life.Lock()
		delete(b.served, entity)
		b.life.Unlock()
		return err
	}
	return nil
}

func (b *Bridge) serves(entity shared.EntityType) bool {
	b.life.RLock()
	defer b.life.RUnlock()
	return b.served[entity]
}

// receive handles one message from the entity type's topic: one key or
// several (shared.Notification). A key with no local subscriber costs
// nothing more than the decode.
func (b *Bridge) receive(entity shared.EntityType, body []byte) {
	b.stats.received.Add(1)
	n, err := decodeNotification(body, entity)
	if err != nil {
		b.log.WithError(err).WithField("entity", entity).Warnf("dropping queue message that is not a key: %.200q", body)
		return
	}
	if n.Entity == "" {
		n.Entity = entity // a producer outside Go may send {"id":"100"} alone
	}
	if n.Entity != entity || n.ID == "" && len(n.IDs) == 0 {
		b.log.WithField("entity", entity).Warnf("dropping queue message with a wrong or empty key: %.200q", body)
		return
	}
	if n.ID != "" {
		b.notified(shared.EntityKey{Entity: entity, ID: n.ID})
	}
	empty := false
	for _, id := range n.IDs {
		if id == "" {
			empty = true
			continue
		}
		b.notified(shared.EntityKey{Entity: entity, ID: id})
	}
	if empty {
		b.log.WithField("entity", entity).Warnf("ignoring empty ids in queue message: %.200q", body)
	}
}

// receiveKey handles one key the queue delivered as it is (esq.KeyQueue):
// published by publishKey, so already checked.
func (b *Bridge) receiveKey(key shared.EntityKey) {
	b.stats.received.Add(1)
	b.notified(key)
}

// notified starts a round of key if this server has subscribers for it.
func (b *Bridge) notified(key shared.EntityKey) {
	sh := b.shard(key)
	sh.mu.Lock()
	ks := sh.keys[key]
	sh.mu.Unlock()
	if ks == nil {
		return
	}
	ks.mu.Lock()
	ks.changes++
	woke := b.request(ks, true)
	small := ks.nsubs <= fanOutShare
	ks.mu.Unlock()
	if woke && small {
		// The worker just woken waits in this goroutine's run slot (the
		// scheduler's runnext) until this goroutine blocks: with the
		// in-process queue that is the app's HTTP handler, which would
		// first write its response. Yielding starts the round now, and
		// this goroutine goes on when a core is free, at worst after the
		// round: so only for a key whose fan-out is short (not split
		// between cores), where those 0.1 ms are a large share of the
		// latency. bench/peer, 20 clients, one server: visible p50
		// 0.63-0.84 of Centrifuge's with it, 0.85-1.13 without, no more
		// CPU.
		runtime.Gosched()
	}
}

// resync re-fetches every locally subscribed key of the entity type: called
// when the queue may have lost messages.
func (b *Bridge) resync(entity shared.EntityType) {
	b.stats.resyncs.Add(1)
	var keys []*keyState
	for i := range b.shards {
		sh := &b.shards[i]
		sh.mu.Lock()
		for key, ks := range sh.keys {
			if key.Entity == entity {
				keys = append(keys, ks)
			}
		}
		sh.mu.Unlock()
	}
	for _, ks := range keys {
		ks.mu.Lock()
		b.request(ks, true) // a no-op for a key removed meanwhile
		ks.mu.Unlock()
	}
	n := len(keys)
	b.stats.resyncedKeys.Add(uint64(n))
	b.log.WithField("entity", entity).Infof("the queue may have lost notifications (broker reconnect, new broker, or a gap in a publisher's sequence): re-fetching %d subscribed keys", n)
}

// index returns the key's state, made if the key had no subscriber, with its
// lock held. created is set when it was made; with a routing queue, the
// caller must then call watch once it released the lock.
func (b *Bridge) index(key shared.EntityKey) (ks *keyState, created bool) {
	sh := b.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	ks = sh.keys[key]
	if ks == nil {
		created = true
		ks = &keyState{key: key, perSecret: b.fetcher.PerSecret(key.Entity), groups: make(map[string]*group), watching: b.interest != nil}
		if c, ok := b.fetcher.(Collections); ok && !ks.perSecret {
			if id := c.RowID(key.Entity); id != nil {
				ks.coll = &collection{rowID: id, log: b.log}
			}
		}
		sh.keys[key] = ks
	}
	ks.mu.Lock()
	return ks, created
}

// startWatch runs watch for ks, which the caller just made, on a goroutine
// of its own: the subscribe that made ks returns at once, and the key's
// first round waits for the Watch (ks.watching). Called without ks.mu.
func (b *Bridge) startWatch(ks *keyState) {
	b.life.RLock()
	defer b.life.RUnlock()
	if b.closed {
		return // the queue is closed or closing: no round will fetch
	}
	b.watchers.Add(1) // under life while open: before Close's Wait
	go func() {
		defer b.watchers.Done()
		b.watch(ks)
	}()
}

// watch makes the routing queue listen for the key's notifications, and
// only then lets the key's first round fetch: a change committed before the
// fetch is in its rows, one committed after is notified to this server. A
// Watch that could not be confirmed (broker down) stays registered, and the
// queue's onLoss re-fetches once it is live. Called without ks.mu, once
// per ks (see startWatch).
func (b *Bridge) watch(ks *keyState) {
	err := b.interest.Watch(ks.key)
	if err != nil && !errors.Is(err, esq.ErrClosed) {
		b.log.WithError(err).WithField("key", ks.key).Warn("the queue could not confirm it listens for the key yet; fetching anyway, and again once it does")
	}
	ks.mu.Lock()
	ks.watching = false
	gone := ks.removed
	if !gone {
		ks.watched = true
		b.request(ks, false)
	}
	ks.mu.Unlock()
	if gone { // the last subscriber left meanwhile: maybeRemove left the Unwatch to us
		b.interest.Unwatch(ks.key)
	}
}

// leave takes c out of the key's group, and the key out of the index when
// that was its last subscriber.
func (b *Bridge) leave(c *Client, ks *keyState, group string) {
	ks.mu.Lock()
	ks.leave(c, group)
	empty := ks.nsubs == 0
	ks.mu.Unlock()
	if empty {
		b.maybeRemove(ks)
	}
}

func (b *Bridge) shard(key shared.EntityKey) *shard {
	var h maphash.Hash
	h.SetSeed(b.seed)
	h.WriteString(string(key.Entity))
	h.WriteByte(0)
	h.WriteString(key.ID)
	return &b.shards[h.Sum64()%shardCount]
}

// Reauthorize runs Authorize again for every subscription of every client
// whose key match selects (nil: all), and withdraws the ones it now refuses:
// the client gets a "revoked" signal and nothing more for that key. Call it
// when access rules change (a user removed from a team, a document made
// private). It returns how many subscriptions were withdrawn.
func (b *Bridge) Reauthorize(match func(shared.EntityKey) bool) int {
	if b.opts.Authorize == nil {
		return 0
	}
	b.clientsMu.Lock()
	clients := make([]*Client, 0, len(b.clients))
	for c := range b.clients {
		clients = append(clients, c)
	}
	b.clientsMu.Unlock()
	n := 0
	for _, c := range clients {
		n += c.reauthorize(match)
	}
	return n
}

// Stats returns the bridge's counters.
func (b *Bridge) Stats() Stats {
	s := Stats{
		Notifications: b.stats.notifications.Load(),
		NotifyErrors:  b.stats.notifyErrors.Load(),
		Received:      b.stats.received.Load(),
		Fetches:       b.stats.fetches.Load(),
		FetchErrors:   b.stats.fetchErrors.Load(),
		Deliveries:    b.stats.deliveries.Load(),
		Resyncs:       b.stats.resyncs.Load(),
		Revocations:   b.stats.revocations.Load(),
		Overflows:     b.stats.overflows.Load(),
		Coalesced:     b.stats.coalesced.Load(),
		ResyncedKeys:  b.stats.resyncedKeys.Load(),
	}
	b.notifier.mu.Lock()
	s.Pending = b.notifier.pending
	b.notifier.mu.Unlock()
	b.clientsMu.Lock()
	s.Clients = len(b.clients)
	for c := range b.clients {
		c.mu.Lock()
		s.PendingBytes += c.bytes
		c.mu.Unlock()
	}
	b.clientsMu.Unlock()
	for i := range b.shards {
		b.shards[i].mu.Lock()
		s.Keys += len(b.shards[i].keys)
		for _, ks := range b.shards[i].keys {
			ks.mu.Lock()
			s.Subscriptions += ks.nsubs
			ks.mu.Unlock()
		}
		b.shards[i].mu.Unlock()
	}
	return s
}

// Close stops taking notifications, publishes those NotifyAsync still holds,
// closes the queue, cancels running fetches and waits for the workers to
// end, or for ctx. Clients are the
// transport's to close (see esweb.Server.Close), before the bridge.
func (b *Bridge) Close(ctx context.Context) error {
	b.life.Lock()
	if b.closed {
		b.life.Unlock()
		return nil
	}
	b.closed = true
	b.life.Unlock()

	nerr := b.closeNotifier(ctx)
	qerr := b.queue.Close(ctx)
	b.cancel()
	b.work.mu.Lock()
	b.work.closed = true
	b.work.keys, b.work.head = nil, 0
	for ; b.work.idle > 0; b.work.idle-- {
		b.work.wake <- struct{}{} // lingering workers see closed and end
	}
	b.work.mu.Unlock()
	b.notifier.mu.Lock()
	publisher := b.notifier.done
	b.notifier.mu.Unlock()
	done := make(chan struct{})
	go func() {
		b.watchers.Wait() // the queue is closed: Watch returns
		b.rounds.Wait()
		if publisher != nil {
			<-publisher
		}
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		return fmt.Errorf("esbridge: close: fetches still running: %w", ctx.Err())
	}
	return errors.Join(nerr, wrapErr("esbridge: close queue", qerr))
}

func wrapErr(what string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", what, err)
}
