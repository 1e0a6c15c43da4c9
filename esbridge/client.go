package esbridge

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/entity-sync/entity-sync/shared"
)

// Client is one local subscriber (a websocket connection) as the bridge sees
// it: its secret, its subscriptions and its outbound queue of updates. The
// transport reads updates with Ready and Take and writes them out.
type Client struct {
	b   *Bridge
	ctx context.Context

	mu     sync.Mutex // serialises subscription changes of this client
	subs   map[shared.EntityKey]*keyState
	closed bool
	// secret is written under mu and read without it, so the hooks can ask
	// for it (shared.Connection.Secret) while mu is held.
	secret atomic.Pointer[string]

	out outbox
}

// ClientBuilder returns a new client of the bridge. ctx is handed to the
// Authorize and Filter hooks; the transport puts a shared.Connection in it.
// It may be nil.
func (b *Bridge) ClientBuilder(ctx context.Context) *Client {
	if ctx == nil {
		ctx = context.Background()
	}
	// subs is made on the first Subscribe: most connections of a big
	// server are idle at any moment, and each byte counts 10,000 times.
	c := &Client{b: b, ctx: ctx, out: newOutbox(b.opts.MaxPendingBytes)}
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

func (c *Client) authorize(key shared.EntityKey) error {
	if c.b.opts.Authorize == nil {
		return nil
	}
	if err := c.b.opts.Authorize(c.ctx, key); err != nil {
		return fmt.Errorf("%w: %s: %w", ErrForbidden, key, err)
	}
	return nil
}

// Subscribe adds key to the client's subscriptions and requests its current
// state, which arrives through the outbound queue like any change.
// Subscribing again to a key re-sends its current state. A refusal by the
// Authorize hook is returned wrapping ErrForbidden.
func (c *Client) Subscribe(key shared.EntityKey) error {
	if err := key.Validate(); err != nil {
		return err
	}
	if !c.b.serves(key.Entity) {
		return fmt.Errorf("%w: %q", ErrEntityNotServed, key.Entity)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	if err := c.authorize(key); err != nil {
		if ks := c.subs[key]; ks != nil { // no longer allowed: withdraw it too
			c.revokeLocked(key, ks, c.Secret())
		}
		return err
	}
	secret := c.Secret()
	if ks := c.subs[key]; ks != nil {
		ks.mu.Lock()
		ks.add(c, secret)
		c.b.request(ks)
		ks.mu.Unlock()
		return nil
	}
	sh := c.b.shard(key)
	sh.mu.Lock()
	ks := sh.keys[key]
	if ks == nil {
		ks = &keyState{key: key, perSecret: c.b.fetcher.PerSecret(key.Entity), groups: make(map[string]*group)}
		sh.keys[key] = ks
	}
	ks.mu.Lock()
	sh.mu.Unlock()
	ks.add(c, secret)
	c.b.request(ks)
	ks.mu.Unlock()
	if c.subs == nil {
		c.subs = make(map[shared.EntityKey]*keyState)
	}
	c.subs[key] = ks
	return nil
}

// Unsubscribe removes key from the client's subscriptions and drops any
// update for it still waiting to be written. Unsubscribing from a key the
// client does not hold is not an error.
func (c *Client) Unsubscribe(key shared.EntityKey) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ks := c.subs[key]; ks != nil {
		delete(c.subs, key)
		c.leave(ks, c.Secret())
	}
	c.out.drop(key)
}

// leave takes the client out of ks, where it is in the group of secret.
// With c.mu held.
func (c *Client) leave(ks *keyState, secret string) {
	ks.mu.Lock()
	ks.remove(c, secret)
	empty := ks.nsubs == 0 && !ks.running.Load()
	ks.mu.Unlock()
	if empty {
		c.b.maybeRemove(ks)
	}
}

// revokeLocked withdraws a subscription: out of the index first, so no
// later change reaches the client, then a revoked signal that replaces any
// update still pending for the key. With c.mu held.
func (c *Client) revokeLocked(key shared.EntityKey, ks *keyState, secret string) {
	delete(c.subs, key)
	c.leave(ks, secret)
	c.out.push(&Update{Key: key, Revoked: true})
	c.b.stats.revocations.Add(1)
}

// SetSecret sets the secret passed to the seed's lookup handlers and to the
// hooks. Every subscription is authorized again under the new secret
// (refused ones are revoked), and keys whose rows depend on the secret are
// fetched again for it.
func (c *Client) SetSecret(secret string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.Secret()
	c.secret.Store(&secret)
	if c.closed || secret == old {
		return
	}
	for key, ks := range c.subs {
		if err := c.authorize(key); err != nil {
			c.revokeLocked(key, ks, old)
			continue
		}
		if !ks.perSecret {
			continue
		}
		ks.mu.Lock()
		ks.remove(c, old)
		ks.add(c, secret)
		c.b.request(ks)
		ks.mu.Unlock()
	}
}

func (c *Client) reauthorize(match func(shared.EntityKey) bool) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for key, ks := range c.subs {
		if match != nil && !match(key) {
			continue
		}
		if c.authorize(key) != nil {
			c.revokeLocked(key, ks, c.Secret())
			n++
		}
	}
	return n
}

// Subscribed reports whether the client holds key.
func (c *Client) Subscribed(key shared.EntityKey) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.subs[key]
	return ok
}

// Subscriptions returns how many keys the client subscribes to.
func (c *Client) Subscriptions() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.subs)
}

// OnReady registers f to be called (from the goroutine that queued the
// update, without locks held) whenever updates become ready or the client
// overflows: a transport can then run a writer only while there is
// something to write, instead of parking a goroutine on Ready. Set it
// before the first Subscribe; f must not block.
func (c *Client) OnReady(f func()) { c.out.notify.Store(&f) }

// Ready is signalled when updates are waiting to be taken, or when the
// client overflowed (see Overflowed).
func (c *Client) Ready() <-chan struct{} {
	c.out.mu.Lock()
	defer c.out.mu.Unlock()
	if c.out.wake == nil { // made on first use: transports that use OnReady never need it
		c.out.wake = make(chan struct{}, 1)
		if len(c.out.pending) > 0 || c.out.overflowed {
			c.out.wake <- struct{}{}
		}
	}
	return c.out.wake
}

// Take appends the waiting updates to buf, oldest key first, and returns it.
// Each key appears at most once, with its newest state.
func (c *Client) Take(buf []*Update) []*Update { return c.out.take(buf) }

// Overflowed reports whether the client fell more than MaxPendingBytes
// behind. Its queue has then been emptied and the transport should close
// the connection.
func (c *Client) Overflowed() bool {
	c.out.mu.Lock()
	defer c.out.mu.Unlock()
	return c.out.overflowed
}

// Close removes every subscription. The client receives nothing afterwards.
func (c *Client) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.closed = true
	for key, ks := range c.subs {
		delete(c.subs, key)
		c.leave(ks, c.Secret())
	}
	c.out.clear()
	c.b.clientsMu.Lock()
	delete(c.b.clients, c)
	c.b.clientsMu.Unlock()
}

// outbox is a client's latest-wins outbound queue: at most one pending update
// per key, so its size is bounded by the client's subscriptions however slowly
// the client reads, and what it finally reads is each key's newest state.
type outbox struct {
	mu         sync.Mutex
	pending    map[shared.EntityKey]*Update
	order      []shared.EntityKey // may hold keys no longer pending; skipped on take
	bytes      int                // row bytes pending
	maxBytes   int
	overflowed bool
	wake       chan struct{}
	notify     atomic.Pointer[func()]
}

func newOutbox(maxBytes int) outbox {
	return outbox{maxBytes: maxBytes} // pending and wake are made on first use: most clients are idle
}

// push queues u, replacing the key's pending update; it reports false once
// the client has overflowed.
func (o *outbox) push(u *Update) bool {
	o.mu.Lock()
	if o.overflowed {
		o.mu.Unlock()
		return false
	}
	if o.pending == nil {
		o.pending = make(map[shared.EntityKey]*Update)
	}
	if old, ok := o.pending[u.Key]; ok {
		o.bytes -= old.size()
	} else {
		o.order = append(o.order, u.Key)
	}
	o.pending[u.Key] = u
	o.bytes += u.size()
	if o.bytes > o.maxBytes {
		o.overflowed = true
		clear(o.pending)
		o.order, o.bytes = nil, 0
	}
	ok := !o.overflowed
	wake := o.wake
	o.mu.Unlock()
	if f := o.notify.Load(); f != nil {
		(*f)()
	}
	if wake != nil {
		select {
		case wake <- struct{}{}:
		default:
		}
	}
	return ok
}

func (o *outbox) take(buf []*Update) []*Update {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, k := range o.order {
		if u, ok := o.pending[k]; ok {
			buf = append(buf, u)
			delete(o.pending, k)
		}
	}
	o.order = o.order[:0]
	o.bytes = 0
	return buf
}

func (o *outbox) drop(key shared.EntityKey) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if u, ok := o.pending[key]; ok {
		o.bytes -= u.size()
		delete(o.pending, key)
	}
	if len(o.order) > 2*len(o.pending)+16 { // keep stale entries bounded
		seen := make(map[shared.EntityKey]bool, len(o.pending))
		kept := o.order[:0]
		for _, k := range o.order {
			if _, ok := o.pending[k]; ok && !seen[k] {
				seen[k] = true
				kept = append(kept, k)
			}
		}
		o.order = kept
	}
}

func (o *outbox) clear() {
	o.mu.Lock()
	defer o.mu.Unlock()
	clear(o.pending)
	o.order, o.bytes = nil, 0
}
