package esbridge

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/entity-sync/entity-sync/shared"
)

// Client is one local subscriber (a websocket connection) as the bridge sees
// it: its secret, its subscriptions, the last Seq it was handed per key, and
// its latest-wins outbound queue. A transport either takes updates from the
// queue (Ready, Take, OnReady) or also installs a direct writer (SetDirect)
// that the fan-out tries first.
type Client struct {
	b   *Bridge
	ctx context.Context

	// change serialises this client's subscription changes (subscribe,
	// unsubscribe, secret, re-authorization, close). It is held while the
	// Authorize hook runs, so the delivery path never takes it.
	change sync.Mutex
	secret atomic.Pointer[string]

	// mu guards what deliveries touch: the subscriptions and the outbound
	// queue. It is held briefly, and across the direct writer's
	// non-blocking write. Lock order: a key's mu before a client's mu, never
	// the reverse.
	mu         sync.Mutex
	subs       map[shared.EntityKey]*subscription
	nsubs      int // live subscriptions (subs also holds revoked keys until their signal is taken)
	closed     bool
	maxSeq     uint64             // the highest Seq handed over, any key
	order      []shared.EntityKey // keys with a pending update, oldest first; may hold stale entries
	npending   int
	bytes      int // size of the pending updates
	overflowed bool
	wake       chan struct{}
	notify     func()
	direct     func(*Update) bool
	diffs      atomic.Bool // AcceptDiffs was called
}

// subscription is one key of one client. Fan-outs hold it (from a group's
// snapshot) and hand it updates without looking the key up; its fields are
// guarded by the client's mu.
type subscription struct {
	c       *Client
	ks      *keyState // nil once unsubscribed or revoked (only the revoked signal is left to take)
	group   string    // the key's group the client is in
	sent    uint64    // Seq of the last update handed over for this key
	pending *Update   // waiting for Take
	held    *held     // with AcceptDiffs: what the client holds, when known
}

// held is what a client that accepts diffs holds of a key, as far as the
// bridge knows: kept apart from subscription, which every subscriber of a
// busy server has, so that it costs only the subscriptions that use it.
type held struct {
	// base, for a collection key: the state the connection holds once
	// everything handed over so far is written, the base of the next
	// update's diff. A pending update does not count until it is taken, so
	// a newer state replacing it is diffed from what the connection
	// actually got.
	base *Update
	// resume is the version the client said it holds when it subscribed,
	// until the first state is handed over: if that state has it, the
	// client is told it is unchanged.
	resume string
}

// ClientBuilder returns a new client of the bridge. ctx is handed to the
// Authorize and Filter hooks; the transport puts a shared.Connection in it
// and should cancel it when the connection ends. It may be nil.
func (b *Bridge) ClientBuilder(ctx context.Context) *Client {
	if ctx == nil {
		ctx = context.Background()
	}
	// subs is made on the first Subscribe: most connections of a big server
	// are idle at any moment, and each byte counts 10,000 times.
	c := &Client{b: b, ctx: ctx}
	c.secret.Store(new(string))
	b.clientsMu.Lock()
	b.clients[c] = struct{}{}
	b.clientsMu.Unlock()
	return c
}

// Context returns the context the client was built with.
func (c *Client) Context() context.Context { return c.ctx }

// Secret returns the secret the client set, or "".
func (c *Client) Secret() string { return *c.secret.Load() }

// SetDirect installs the transport's direct writer: the fan-out calls f with
// an update when nothing is queued for the client, and f either writes it
// at once without blocking (true) or declines (false: the update is queued
// for Take and OnReady's function is called). f is called with the client's
// lock held: it must not call back into the client or block. Set it before
// the first Subscribe.
func (c *Client) SetDirect(f func(*Update) bool) {
	c.mu.Lock()
	c.direct = f
	c.mu.Unlock()
}

// AcceptDiffs tells the bridge that the transport can send a state as a
// difference from, or as unchanged relative to, the state the client holds:
// updates handed to this client may then be views (see Update.Diff and
// Update.Unchanged), and SubscribeFrom's version is used. Call it before
// the first Subscribe.
func (c *Client) AcceptDiffs() { c.diffs.Store(true) }

// OnReady registers f to be called (without locks held) whenever updates
// become ready or the client overflows: a transport can then run a writer
// only while there is something to write. Set it before the first
// Subscribe; f must not block.
func (c *Client) OnReady(f func()) {
	c.mu.Lock()
	c.notify = f
	c.mu.Unlock()
}

// Ready is signalled when updates are waiting to be taken, or when the
// client overflowed (see Overflowed).
func (c *Client) Ready() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.wake == nil { // made on first use: transports that use OnReady never need it
		c.wake = make(chan struct{}, 1)
		if c.npending > 0 || c.overflowed {
			c.wake <- struct{}{}
		}
	}
	return c.wake
}

// Take appends the waiting updates to buf, oldest key first, and returns it.
// Each key appears at most once, with its newest state.
func (c *Client) Take(buf []*Update) []*Update {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, k := range c.order {
		s := c.subs[k]
		if s == nil || s.pending == nil {
			continue
		}
		buf = append(buf, s.pending)
		s.handedOver(s.pending)
		s.pending = nil
		if s.ks == nil {
			delete(c.subs, k) // the revoked signal was the last thing to send
		}
	}
	clear(c.order)
	c.order = c.order[:0]
	c.npending, c.bytes = 0, 0
	return buf
}

// Overflowed reports whether the client fell more than MaxPendingBytes
// behind. Its queue has then been emptied and the transport should close
// the connection.
func (c *Client) Overflowed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.overflowed
}

// Subscribed reports whether the client holds key.
func (c *Client) Subscribed(key shared.EntityKey) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.subs[key]
	return s != nil && s.ks != nil
}

// Subscriptions returns how many keys the client subscribes to.
func (c *Client) Subscriptions() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nsubs
}

// deliver hands u to the client unless it is not subscribed to u's key in
// u's group, or already has u's state or a newer one. It reports whether u
// was handed over.
func (c *Client) deliver(u *Update) bool {
	c.mu.Lock()
	s := c.subs[u.Key]
	c.mu.Unlock()
	if s == nil {
		return false
	}
	return c.deliverTo(s, u)
}

// deliverTo is deliver for the subscription s of c (the fan-out's path).
func (c *Client) deliverTo(s *subscription, u *Update) bool {
	c.mu.Lock()
	if c.closed || c.overflowed || s.ks == nil || s.group != u.group || u.Seq <= s.sent {
		c.mu.Unlock()
		return false
	}
	s.sent = u.Seq
	if u.Seq > c.maxSeq {
		c.maxSeq = u.Seq
	}
	if c.diffs.Load() {
		u = s.view(u)
	}
	if c.npending == 0 && c.direct != nil && c.direct(u) {
		s.handedOver(u)
		c.mu.Unlock()
		return true
	}
	ok := c.queueLocked(s, u)
	c.unlockAndSignal()
	return ok
}

// view returns what to hand s's client for state u: u itself, or a view of
// it relative to the state the client holds (see Update.Diff,
// Update.Unchanged). With c.mu held.
func (s *subscription) view(u *Update) *Update {
	h := s.held
	if h == nil {
		return u
	}
	if h.resume != "" {
		v := h.resume
		h.resume = ""
		if u.Version() == v {
			if u.Collection() {
				h.base = u.canon()
			}
			return u.unchangedView()
		}
	}
	if h.base == nil || !u.Collection() {
		return u
	}
	return u.viewFrom(h.base)
}

// handedOver records that u went to the transport, to be written next:
// for a collection, the connection then holds u's state. With c.mu held.
func (s *subscription) handedOver(u *Update) {
	if !u.Collection() || !s.c.diffs.Load() {
		return
	}
	if s.held == nil {
		s.held = &held{}
	}
	s.held.base = u.canon()
}

// queueLocked makes u the pending update of s, replacing an older one. Past
// MaxPendingBytes the client overflows: its queue is emptied and the
// transport told to close it. With c.mu held.
func (c *Client) queueLocked(s *subscription, u *Update) bool {
	if s.pending == nil {
		c.order = append(c.order, u.Key)
		c.npending++
	} else {
		c.bytes -= s.pending.size()
		c.b.stats.coalesced.Add(1)
	}
	s.pending = u
	c.bytes += u.size()
	if c.bytes <= c.b.opts.MaxPendingBytes {
		return true
	}
	c.overflowed = true
	c.b.stats.overflows.Add(1)
	for _, s := range c.subs {
		s.pending = nil
	}
	c.order, c.npending, c.bytes = nil, 0, 0
	return false
}

// unlockAndSignal releases c.mu and tells the transport that something is
// ready.
func (c *Client) unlockAndSignal() {
	notify, wake := c.notify, c.wake
	c.mu.Unlock()
	if notify != nil {
		notify()
	}
	if wake != nil {
		select {
		case wake <- struct{}{}:
		default:
		}
	}
}

// dropPendingLocked forgets s's pending update. With c.mu held.
func (c *Client) dropPendingLocked(s *subscription) {
	if s.pending == nil {
		return
	}
	c.bytes -= s.pending.size()
	c.npending--
	s.pending = nil
	if len(c.order) > 2*c.npending+16 { // keep stale entries bounded
		kept := c.order[:0]
		for _, k := range c.order {
			if p := c.subs[k]; p != nil && p.pending != nil && !contains(kept, k) {
				kept = append(kept, k)
			}
		}
		clear(c.order[len(kept):])
		c.order = kept
	}
}

func contains(keys []shared.EntityKey, k shared.EntityKey) bool {
	for _, x := range keys {
		if x == k {
			return true
		}
	}
	return false
}

func (c *Client) authorize(key shared.EntityKey) (err error) {
	if c.b.opts.Authorize == nil {
		return nil
	}
	defer func() {
		if r := recover(); r != nil {
			c.b.log.WithField("key", key.String()).Errorf("Authorize panicked; subscription refused: %v", r)
			err = fmt.Errorf("%w: %s: Authorize panicked", shared.ErrForbidden, key)
		}
	}()
	if err := c.b.opts.Authorize(c.ctx, key); err != nil {
		return fmt.Errorf("%w: %s: %w", shared.ErrForbidden, key, err)
	}
	return nil
}

func (c *Client) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

func (c *Client) live(key shared.EntityKey) *subscription {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s := c.subs[key]; s != nil && s.ks != nil {
		return s
	}
	return nil
}

// Subscribe adds key to the client's subscriptions and hands it the key's
// current state: at once when this server already holds it (no fetch), or
// after a fetch. Subscribing again to a held key sends its current state
// again. A refusal by the Authorize hook is returned wrapping shared.ErrForbidden;
// a held key that is refused is revoked.
func (c *Client) Subscribe(key shared.EntityKey) error { return c.SubscribeFrom(key, "") }

// SubscribeFrom is Subscribe for a client that already holds the state of
// key whose version is version (see Update.Version; "" for none), say from
// before a reconnect. With AcceptDiffs, the key's first state is then
// handed over as Unchanged if it has that version, and for a collection
// key as a diff from that state if the bridge still keeps it (the current
// state or one of Options.KeptStates earlier ones); otherwise, and without
// AcceptDiffs, in full. Subscribing again to a held key replaces what the
// bridge knew the client held by version.
func (c *Client) SubscribeFrom(key shared.EntityKey, version string) error {
	if err := key.Validate(); err != nil {
		return err
	}
	if !c.b.serves(key.Entity) {
		return fmt.Errorf("%w: %q", ErrEntityNotServed, key.Entity)
	}
	c.change.Lock()
	defer c.change.Unlock()
	if c.isClosed() {
		return ErrClosed
	}
	if err := c.authorize(key); err != nil {
		if s := c.live(key); s != nil {
			c.revoke(key, s)
		}
		return err
	}
	s := c.live(key)
	var ks *keyState
	if s != nil {
		ks = s.ks
		ks.mu.Lock()
	} else {
		var created bool
		ks, created = c.b.index(key) // locked
		if created && c.b.interest != nil {
			// After ks.mu is released below. The Watch runs on its own
			// goroutine: a broker round trip must hold neither this
			// client's other requests nor its other keys' watches.
			defer c.b.startWatch(ks)
		}
		s = &subscription{c: c, ks: ks, group: ks.groupName(c.Secret())}
		c.mu.Lock()
		if c.subs == nil {
			c.subs = make(map[shared.EntityKey]*subscription)
		}
		if old := c.subs[key]; old != nil { // a revoked signal not yet taken: superseded
			c.dropPendingLocked(old)
		}
		s.sent = c.maxSeq // nothing older than what this client has seen, whatever the key
		c.subs[key] = s
		c.nsubs++
		c.mu.Unlock()
	}
	g := ks.join(s, s.group)
	if c.diffs.Load() {
		c.resumeFrom(s, ks, g, version)
	}
	cur := c.currentFor(g, s)
	c.b.request(ks, false) // a new group needs its first fetch
	ks.mu.Unlock()
	if cur != nil {
		c.send(cur)
	}
	return nil
}

// resumeFrom records that s's client holds the state with the given version
// (none: ""), instead of what the bridge knew it held. A collection state
// that g still keeps becomes the base of the next diff; otherwise the next
// state goes in full, or as unchanged if it has that version. With a row
// filter, the kept states are not what the client may see, so only the
// check against the state actually handed over is made. With ks.mu held.
func (c *Client) resumeFrom(s *subscription, ks *keyState, g *group, version string) {
	var base *Update
	if version != "" && ks.coll != nil && c.b.opts.Filter == nil {
		base = ks.kept(g, version)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case base == nil && version == "":
		s.held = nil // holds nothing
	case s.held == nil:
		s.held = &held{base: base, resume: version}
	default:
		*s.held = held{base: base, resume: version}
	}
	if p := s.pending; p != nil && !p.Revoked {
		// Made for the old base: make it again for the new one (the same
		// state, so not a latest-wins replacement; never larger, so never
		// an overflow).
		s.pending = s.view(p.Full())
		c.bytes += s.pending.size() - p.size()
	}
}

// currentFor returns g's current state for s, under a fresh Seq if s may
// already have seen its Seq, or nil if g has none yet (its first fetch
// will deliver it). The Seq is drawn with the key's lock held, so a state
// published later still gets a higher one. With ks.mu held.
func (c *Client) currentFor(g *group, s *subscription) *Update {
	cur := g.current
	if cur == nil {
		return nil
	}
	c.mu.Lock()
	seen := s.sent
	c.mu.Unlock()
	if cur.Seq <= seen {
		cur = cur.withSeq(c.b.seq.Add(1))
	}
	return cur
}

// send delivers a state outside a fan-out (a subscribe, a secret change),
// through the row filter.
func (c *Client) send(u *Update) {
	if c.b.opts.Filter != nil {
		if u = c.b.filter(c, u); u == nil {
			return
		}
	}
	if c.deliver(u) {
		c.b.stats.deliveries.Add(1)
	}
}

// Unsubscribe removes key from the client's subscriptions and drops any
// update for it still waiting to be taken. Unsubscribing from a key the
// client does not hold is not an error.
func (c *Client) Unsubscribe(key shared.EntityKey) {
	c.change.Lock()
	defer c.change.Unlock()
	c.mu.Lock()
	s := c.subs[key]
	if s == nil {
		c.mu.Unlock()
		return
	}
	c.dropPendingLocked(s)
	delete(c.subs, key)
	ks := s.ks
	if ks != nil {
		c.nsubs--
		s.ks = nil // fan-outs still holding s skip it
	}
	c.mu.Unlock()
	if ks != nil {
		c.b.leave(c, ks, s.group)
	}
}

// revoke withdraws a subscription: out of the index first, so no later change
// reaches the client, then a revoked signal that replaces any update still
// pending for the key. With c.change held.
func (c *Client) revoke(key shared.EntityKey, s *subscription) {
	c.mu.Lock()
	ks := s.ks
	s.ks = nil
	c.nsubs--
	c.dropPendingLocked(s)
	c.mu.Unlock()
	c.b.leave(c, ks, s.group)
	c.mu.Lock()
	if c.closed || c.subs[key] != s {
		c.mu.Unlock()
		return
	}
	c.queueLocked(s, &Update{Key: key, Revoked: true})
	c.unlockAndSignal()
	c.b.stats.revocations.Add(1)
}

// liveSubs returns the client's live subscriptions.
func (c *Client) liveSubs() map[shared.EntityKey]*subscription {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := make(map[shared.EntityKey]*subscription, c.nsubs)
	for k, s := range c.subs {
		if s.ks != nil {
			m[k] = s
		}
	}
	return m
}

// SetSecret sets the secret passed to the seed's lookup handlers and to the
// hooks. Every subscription is authorized again under the new secret
// (refused ones are revoked). Keys whose rows depend on the secret (or on
// the connection, with a Filter) switch to the new secret's state: an
// update of the old one still waiting is dropped, so none is sent after
// SetSecret returns, and the new state follows at once when this server
// holds it, or after a fetch.
func (c *Client) SetSecret(secret string) {
	c.change.Lock()
	defer c.change.Unlock()
	old := c.Secret()
	c.secret.Store(&secret)
	if c.isClosed() || secret == old {
		return
	}
	for key, s := range c.liveSubs() {
		if err := c.authorize(key); err != nil {
			c.revoke(key, s)
			continue
		}
		ks := s.ks
		name := ks.groupName(secret)
		if name == s.group && c.b.opts.Filter == nil {
			continue // the same rows whatever the secret
		}
		ks.mu.Lock()
		if name != s.group {
			ks.leave(c, s.group)
		}
		g := ks.join(s, name)
		c.mu.Lock()
		s.group = name
		c.dropPendingLocked(s)
		c.mu.Unlock()
		cur := c.currentFor(g, s)
		c.b.request(ks, false)
		ks.mu.Unlock()
		if cur != nil {
			c.send(cur)
		}
	}
}

func (c *Client) reauthorize(match func(shared.EntityKey) bool) int {
	c.change.Lock()
	defer c.change.Unlock()
	n := 0
	for key, s := range c.liveSubs() {
		if match != nil && !match(key) {
			continue
		}
		if c.authorize(key) != nil {
			c.revoke(key, s)
			n++
		}
	}
	return n
}

// Close removes every subscription. The client receives nothing afterwards.
func (c *Client) Close() {
	c.change.Lock()
	defer c.change.Unlock()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	type left struct {
		ks    *keyState
		group string
	}
	var leaving []left
	for _, s := range c.subs {
		if s.ks != nil {
			leaving = append(leaving, left{s.ks, s.group})
			s.ks = nil
		}
	}
	c.subs, c.order, c.npending, c.bytes, c.nsubs = nil, nil, 0, 0, 0
	c.mu.Unlock()
	for _, l := range leaving {
		c.b.leave(c, l.ks, l.group)
	}
	c.b.clientsMu.Lock()
	delete(c.b.clients, c)
	c.b.clientsMu.Unlock()
}
