package esclient

import (
	"encoding/json"
	"fmt"
	"slices"
	"sync/atomic"

	"github.com/entity-sync/entity-sync/shared"
)

// Handlers are a subscription's callbacks. Each may be nil. They run on the
// client's callback goroutine, one at a time (see the package
// documentation), and never after the subscription ended: after its
// unsubscribe function was called, or after Revoked or Error.
type Handlers struct {
	// Rows receives the key's state: all rows of one change, each as the
	// server's fetch function produced it (a row that is not JSON arrives as
	// a JSON string). The slice is shared with other subscribers of the key:
	// do not modify it.
	Rows func(rows []json.RawMessage)
	// Gone is called when the key has no rows (the entity does not exist or
	// was deleted). The subscription stays: Rows follows if it comes back.
	Gone func()
	// Revoked is called when the server withdrew the subscription (the
	// connection lost access to the key). The subscription has ended and is
	// not sent again on reconnect; subscribe again if access may have come
	// back. If Revoked is nil, Gone is called instead.
	Revoked func(reason string)
	// Changes, if set, receives every state the key's Rows and Gone
	// callbacks receive, with more: a collection's row ids, what changed
	// since the previous state (see Snapshot) and the state's version. For
	// a key that is not a collection, IDs and Changes are empty. A server
	// answering a resubscribe with "unchanged" (after a reconnect, nothing
	// changed) calls no callback at all, nor does a diff that brings the
	// key back to the rows the client holds.
	Changes func(s Snapshot)
	// Error is called when the server refused the subscription (a
	// *ServerError: unknown_entity, forbidden, invalid_key,
	// too_many_subscriptions, ...). The subscription has ended. The client
	// itself ends a subscription with too_many_subscriptions, without
	// sending it, when the connection already holds as many keys as the
	// server's welcome allows (limits.maxSubscriptions); after a reconnect
	// the oldest subscriptions are kept. A
	// rate_limited refusal does not end it: the client retries after a
	// delay. If Error is nil, the error goes to Options.OnError.
	Error func(err error)
}

// sub is the client's one subscription to a key, shared by every handle
// subscribed to it.
type sub struct {
	key     shared.EntityKey
	order   uint64 // creation order: resubscribed oldest first
	handles []*handle
	// The last state received, given at once to a handle that joins later,
	// and whose version is sent when subscribing again.
	state state
	// resyncing is set while a subscribe sent because a diff did not apply
	// awaits its answer: diffs meanwhile are dropped without asking again.
	resyncing bool
}

// handle is one Subscribe call.
type handle struct {
	h         Handlers
	active    atomic.Bool // false once unsubscribed, revoked or refused
	cancelled atomic.Bool // its unsubscribe function was called
}

func (h *handle) deliver(snap Snapshot) {
	if !h.active.Load() {
		return
	}
	switch gone := len(snap.Rows) == 0; {
	case gone && h.h.Gone != nil:
		h.h.Gone()
	case !gone && h.h.Rows != nil:
		h.h.Rows(snap.Rows)
	}
	if h.h.Changes != nil && h.active.Load() {
		h.h.Changes(snap)
	}
}

func (h *handle) revoked(reason string) {
	if h.cancelled.Load() {
		return
	}
	switch {
	case h.h.Revoked != nil:
		h.h.Revoked(reason)
	case h.h.Gone != nil:
		h.h.Gone()
	}
}

func (h *handle) failed(err error, fallback func(error)) {
	if h.cancelled.Load() {
		return
	}
	switch {
	case h.h.Error != nil:
		h.h.Error(err)
	case fallback != nil:
		fallback(err)
	}
}

// Subscribe subscribes to key: onRows receives the key's rows now and after
// every change, onGone (which may be nil) is called while the key has no
// rows. It returns the function that ends this subscription; calling it more
// than once does nothing. Problems go to Options.OnError; use SubscribeWith
// to handle them per subscription.
func (c *Client) Subscribe(key shared.EntityKey, onRows func(rows []json.RawMessage), onGone func()) (unsubscribe func()) {
	unsub, err := c.SubscribeWith(key, Handlers{Rows: onRows, Gone: onGone})
	if err != nil {
		c.mu.Lock()
		c.reportLocked(err)
		c.mu.Unlock()
	}
	return unsub
}

// SubscribeWith subscribes to key with a full set of callbacks. Several
// subscriptions to one key share one server-side subscription: only the
// first sends a subscribe request, and a later one receives the key's last
// known state right away. The returned function ends this subscription;
// when the last subscription to a key ends, the client unsubscribes on the
// server. The error is immediate only for an empty key part or a closed
// client (the function returned is then a no-op); the server's refusals
// arrive later, through h.Error.
func (c *Client) SubscribeWith(key shared.EntityKey, h Handlers) (unsubscribe func(), err error) {
	if err := key.Validate(); err != nil {
		return func() {}, fmt.Errorf("esclient: subscribe %s: %w", key, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return func() {}, ErrClosed
	}
	hd := &handle{h: h}
	hd.active.Store(true)
	s := c.subs[key]
	if s == nil {
		c.nextOrder++
		s = &sub{key: key, order: c.nextOrder, handles: []*handle{hd}}
		c.subs[key] = s
		if cn := c.conn; cn != nil && cn.ready {
			c.subscribeOn(cn, s) // or ends it at once, when the server's limit is reached
		}
		return func() { c.unsubscribe(s, hd) }, nil
	}
	if s.state.has {
		snap := s.state.snapshot()
		c.events.push(func() { hd.deliver(snap) })
	}
	s.handles = append(s.handles, hd)
	return func() { c.unsubscribe(s, hd) }, nil
}

func (c *Client) unsubscribe(s *sub, hd *handle) {
	hd.cancelled.Store(true)
	c.mu.Lock()
	defer c.mu.Unlock()
	if !hd.active.CompareAndSwap(true, false) {
		return
	}
	s.handles = slices.DeleteFunc(s.handles, func(x *handle) bool { return x == hd })
	if len(s.handles) > 0 || c.subs[s.key] != s {
		return
	}
	delete(c.subs, s.key)
	if cn := c.conn; cn != nil && cn.ready && !c.closed {
		c.sendUnsubscribe(cn, s.key)
	}
}

// end removes a subscription the server ended; its handles become inactive.
func (c *Client) end(s *sub) {
	delete(c.subs, s.key)
	if cn := c.conn; cn != nil {
		delete(cn.lastSeq, s.key)
	}
	for _, h := range s.handles {
		h.active.Store(false)
	}
}

// ServerError is a request the server refused, or one the client did not
// send because the server's announced limits would refuse it
// (too_many_subscriptions; its Message then starts with "not sent").
type ServerError struct {
	Code    shared.ErrorCode
	Message string
	// Action is the refused request's action ("subscribe", "unsubscribe",
	// "secret"), empty when the server could not tell which request it was.
	Action shared.Action
	// Key is the key the request was about, if any.
	Key shared.EntityKey
}

func (e *ServerError) Error() string {
	s := "esclient: server refused"
	if e.Action != "" {
		s += " " + string(e.Action)
	}
	if e.Key != (shared.EntityKey{}) {
		s += " " + e.Key.String()
	}
	return s + ": " + string(e.Code) + ": " + e.Message
}
