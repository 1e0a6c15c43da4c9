package esbridge

import (
	"context"
	"fmt"
	"sync"

	"github.com/entity-sync/entity-sync/shared"
)

// Client is one local subscriber (a websocket connection) as the bridge sees
// it: its secret, its subscriptions and its outbound queue of updates. The
// transport reads updates with Ready and Take and writes them out.
type Client struct {
	b   *Bridge
	ctx context.Context

	mu     sync.Mutex
	secret string
	subs   map[shared.EntityKey]*keyState
	closed bool

	out outbox
}

// ClientBuilder returns a new client of the bridge. ctx carries the
// connection's details for the application's hooks; it may be nil.
func (b *Bridge) ClientBuilder(ctx context.Context) *Client {
	if ctx == nil {
		ctx = context.Background()
	}
	b.clients.Add(1)
	return &Client{b: b, ctx: ctx, subs: make(map[shared.EntityKey]*keyState), out: newOutbox()}
}

// Context returns the context the client was built with.
func (c *Client) Context() context.Context { return c.ctx }

// Secret returns the secret the client set, or "".
func (c *Client) Secret() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.secret
}

// Subscribe adds key to the client's subscriptions and requests its current
// state, which arrives through the outbound queue like any change. Subscribing
// again to a key re-sends its current state.
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
	if old := c.subs[key]; old != nil {
		old.mu.Lock()
		if !old.removed {
			old.add(c, c.secret)
			c.b.request(old)
			old.mu.Unlock()
			return nil
		}
		old.mu.Unlock()
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
	ks.add(c, c.secret)
	c.b.request(ks)
	ks.mu.Unlock()
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
		c.unsubscribeLocked(ks)
	}
	c.out.drop(key)
}

func (c *Client) unsubscribeLocked(ks *keyState) {
	ks.mu.Lock()
	ks.remove(c, c.secret)
	empty := ks.nsubs == 0 && !ks.running
	ks.mu.Unlock()
	if empty {
		c.b.maybeRemove(ks)
	}
}

// SetSecret sets the secret passed to the seed's lookup handlers. Keys whose
// rows depend on the secret are fetched again for the new one.
func (c *Client) SetSecret(secret string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || secret == c.secret {
		c.secret = secret
		return
	}
	old := c.secret
	c.secret = secret
	for _, ks := range c.subs {
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

// Subscriptions returns how many keys the client subscribes to.
func (c *Client) Subscriptions() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.subs)
}

// Ready is signalled when updates are waiting to be taken.
func (c *Client) Ready() <-chan struct{} { return c.out.wake }

// Take appends the waiting updates to buf, oldest key first, and returns it.
// Each key appears at most once, with its newest state.
func (c *Client) Take(buf []*Update) []*Update { return c.out.take(buf) }

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
		c.unsubscribeLocked(ks)
	}
	c.out.clear()
	c.b.clients.Add(-1)
}

// outbox is a client's latest-wins outbound queue: at most one pending update
// per key, so its size is bounded by the client's subscriptions however slowly
// the client reads, and what it finally reads is each key's newest state.
type outbox struct {
	mu      sync.Mutex
	pending map[shared.EntityKey]*Update
	order   []shared.EntityKey // may hold keys no longer pending; skipped on take
	wake    chan struct{}
}

func newOutbox() outbox {
	return outbox{pending: make(map[shared.EntityKey]*Update), wake: make(chan struct{}, 1)}
}

func (o *outbox) push(u *Update) {
	o.mu.Lock()
	if _, ok := o.pending[u.Key]; !ok {
		o.order = append(o.order, u.Key)
	}
	o.pending[u.Key] = u
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
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
	return buf
}

func (o *outbox) drop(key shared.EntityKey) {
	o.mu.Lock()
	defer o.mu.Unlock()
	delete(o.pending, key)
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
	o.order = nil
}
