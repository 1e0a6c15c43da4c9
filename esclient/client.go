// Package esclient is a Go client for entity-sync servers. It speaks the
// envelope protocol (websocket subprotocol "entitysync.v1", described in
// docs/protocol.md) and keeps a set of subscriptions alive across
// disconnects:
//
//   - Subscribe registers callbacks for an entity key; the first subscription
//     to a key sends one subscribe request, further ones share it (reference
//     counted) and get the key's last known state at once. The returned
//     function unsubscribes; the last one to go sends the unsubscribe.
//   - The server's "rows" frames reach the Rows callback, "gone" frames the
//     Gone callback. A frame whose seq is not above the last one applied for
//     its key on the current connection is dropped, so state never goes back
//     in time.
//   - Collections (keys of an entity type the server registered with
//     RegisterCollection): the client keeps the key's rows by id, applies
//     the server's "diff" frames to them, and hands the Changes callback
//     every state with what changed (added, modified, removed, see
//     Snapshot). A diff from a state the client does not hold is never
//     applied: the client subscribes to the key again and the answer brings
//     it up to date.
//   - When the connection ends for any reason other than Close, the client
//     reconnects with exponential backoff and full jitter (between 0 and a
//     ceiling that starts at Options.MinBackoff, 0.5s by default, and doubles
//     up to Options.MaxBackoff, 20s by default). The ceiling starts afresh
//     only once a connection stayed open Options.HealthyAfter (5s by
//     default) after its welcome, so a server that drops the client right
//     after welcoming it, or after acking its subscriptions, is not hammered.
//     After the server's welcome the client sends the secret (if one is set)
//     and then every subscription again, oldest first, each with the
//     version of the state it holds; the server answers with the current
//     state, only what changed since that version, or "unchanged" (then no
//     callback runs), so a change made while the client was away is not
//     missed and nothing it holds is sent again. Sequence numbers start
//     afresh on the new connection.
//   - The client respects the limits the server announces in its welcome:
//     requests go out within its token bucket (limits.messageBurst at once,
//     then limits.messagesPerSecond) with at most 32 awaiting an answer,
//     and no more keys than limits.maxSubscriptions are subscribed on one
//     connection; a subscription past that limit is not sent but ended with
//     a too_many_subscriptions error (see Handlers.Error).
//   - A connection that stays silent too long is presumed dead, closed and
//     replaced as above: after 2 x the heartbeat interval the server
//     announced in its welcome (plus 1s), or Options.ReadTimeout if it
//     announced none. TCP alone may not notice a half-open connection (after
//     a laptop sleep, say) for many minutes.
//   - Requests carry a reference, so the server's ack or error is matched to
//     the request. A refused subscribe ends the subscription and is reported
//     to its Error callback (see Handlers); a "revoked" frame ends it too.
//
// Callbacks run one at a time, in the order the events happened, on a
// goroutine the client owns: a callback may call Subscribe, an unsubscribe
// function or SetSecret, but should return quickly, since later events wait
// for it. Events are queued without bound while a callback runs.
package esclient

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/shared"
)

// State is the client's connection state.
type State int

const (
	// Connecting: dialing the server or waiting for its welcome frame.
	Connecting State = iota
	// Connected: the server welcomed the client, and the secret and every
	// subscription have been queued on this connection (they go out paced
	// within the server's announced rate limit).
	Connected
	// Disconnected: the last connection ended or the last attempt failed; the
	// next attempt waits for its backoff delay.
	Disconnected
	// Closed: Close was called. The client does nothing more.
	Closed
)

func (s State) String() string {
	switch s {
	case Connecting:
		return "connecting"
	case Connected:
		return "connected"
	case Disconnected:
		return "disconnected"
	case Closed:
		return "closed"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// Options tunes a client. The zero value works: no secret, default timeouts
// and backoff, no callbacks.
type Options struct {
	// Secret, if set, is sent on every connection before the subscriptions,
	// as if SetSecret had been called before connecting.
	Secret string
	// Header holds extra HTTP headers for the websocket handshake (a cookie,
	// an Authorization header).
	Header http.Header
	// Dialer dials the websocket. Nil means a dialer like
	// websocket.DefaultDialer. The client sets its Subprotocols to
	// entitysync.v1 on a copy; the original is not modified.
	Dialer *websocket.Dialer
	// MinBackoff is the ceiling of the first reconnect delay; each failed
	// attempt doubles the ceiling up to MaxBackoff, and each delay is drawn
	// uniformly between 0 and the ceiling (full jitter). Defaults 500ms and
	// 20s. The ceiling starts afresh only after a connection that stayed
	// open HealthyAfter.
	MinBackoff, MaxBackoff time.Duration
	// HealthyAfter is how long a connection must stay open after the
	// server's welcome for the reconnect backoff to start afresh when it
	// ends. Default 5s. Answers from the server do not count: a server that
	// welcomes the client, even acks its subscriptions, and drops it at once
	// thus sees the client back off further each time.
	HealthyAfter time.Duration
	// HandshakeTimeout bounds one connection attempt: dial, upgrade and the
	// server's welcome frame. Default 10s.
	HandshakeTimeout time.Duration
	// ReadTimeout is how long the connection may stay silent before the
	// client gives up on it and reconnects, when the server announces no
	// heartbeat (entity-sync's servers announce one, every 25s by default).
	// Default 75s. A server whose welcome frame carries heartbeatMs promises a frame
	// at least that often; the client then gives up after 2 x heartbeatMs +
	// 1s without any frame instead (docs/protocol.md, "heartbeat").
	ReadTimeout time.Duration
	// WriteTimeout bounds one write to the server. Default 10s.
	WriteTimeout time.Duration
	// OnState, if set, is called with every change of connection state, in
	// order, like the other callbacks. err is why the client is
	// Disconnected (the dial error or the reason the connection ended), nil
	// otherwise.
	OnState func(state State, err error)
	// OnError, if set, receives problems that belong to no subscription: a
	// refused secret, a server error frame without a reference, an
	// undecodable frame, a rate-limited request that the client will retry,
	// and refused subscriptions whose Handlers have no Error callback. Server
	// refusals are *ServerError values.
	OnError func(err error)

	// jitter, if set, replaces the random draw of a backoff delay in
	// [0, ceil]: tests set it to make delays predictable.
	jitter func(ceil time.Duration) time.Duration
}

func (o *Options) setDefaults() {
	if o.MinBackoff <= 0 {
		o.MinBackoff = 500 * time.Millisecond
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 20 * time.Second
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = o.MinBackoff
	}
	if o.HealthyAfter <= 0 {
		o.HealthyAfter = 5 * time.Second
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = 10 * time.Second
	}
	if o.ReadTimeout <= 0 {
		o.ReadTimeout = 75 * time.Second
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 10 * time.Second
	}
}

// ErrClosed is returned by calls on a closed client.
var ErrClosed = errors.New("esclient: client closed")

// ErrNotEnvelope means the server answered the handshake without accepting
// the entitysync.v1 subprotocol (an old server, or another endpoint).
var ErrNotEnvelope = errors.New("esclient: server did not accept subprotocol " + shared.Subprotocol)

// Client is a connection to an entity-sync server that reconnects on its own
// and keeps its subscriptions. Its methods are safe for concurrent use.
type Client struct {
	url    string
	opts   Options
	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	events dispatcher
	done   chan struct{} // closed when the connection loop returns

	mu     sync.Mutex
	state  State
	closed bool
	secret string
	subs   map[shared.EntityKey]*sub
	conn   *conn // the current connection, nil between connections

	nextOrder uint64 // creation order of subscriptions

	// resyncs counts subscribes sent because a state frame did not apply to
	// the state held (a diff from another base): with a correct server,
	// only after races with the client's own unsubscribes. Tests read it.
	resyncs atomic.Uint64
}

// New returns a client that connects to rawURL in the background and keeps
// reconnecting until Close. rawURL is a ws:// or wss:// URL (http:// and
// https:// are accepted and mapped), normally ending in shared.WebsocketPath. Only an
// unusable URL is an error; subscribe right away, the subscriptions are sent
// once connected.
func New(rawURL string, opts Options) (*Client, error) {
	c, err := newClient(rawURL, opts)
	if err != nil {
		return nil, err
	}
	go c.run(nil)
	return c, nil
}

// Dial connects to rawURL and returns once the server has welcomed the
// client, or with the first attempt's error (the client is then discarded).
// ctx bounds only this first attempt; after Dial returns, the client
// reconnects on its own until Close, like one made by New.
func Dial(ctx context.Context, rawURL string, opts Options) (*Client, error) {
	c, err := newClient(rawURL, opts)
	if err != nil {
		return nil, err
	}
	c.setState(Connecting, nil)
	// Close (from a callback, say) must interrupt the attempt too.
	dctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		select {
		case <-c.ctx.Done():
			stop()
		case <-dctx.Done():
		}
	}()
	cn, err := c.connect(dctx)
	if err != nil {
		close(c.done)
		c.Close()
		return nil, err
	}
	c.activate(cn)
	go c.run(cn)
	return c, nil
}

func newClient(rawURL string, opts Options) (*Client, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("esclient: bad URL: %w", err)
	}
	switch u.Scheme {
	case "ws", "wss":
	case "http":
		u.Scheme = "ws"
	case "https":
		u.Scheme = "wss"
	default:
		return nil, fmt.Errorf("esclient: URL %q: scheme must be ws or wss", rawURL)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("esclient: URL %q has no host", rawURL)
	}
	opts.setDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	c := &Client{
		url:    u.String(),
		opts:   opts,
		ctx:    ctx,
		cancel: cancel,
		events: newDispatcher(),
		done:   make(chan struct{}),
		secret: opts.Secret,
		subs:   make(map[shared.EntityKey]*sub),
	}
	go c.events.loop()
	return c, nil
}

// State returns the current connection state.
func (c *Client) State() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

// SetSecret sets the secret the server passes to the application's lookup
// handlers and authorization hooks for this connection. It is sent now if
// connected, and again first thing on every reconnect. The server checks
// every subscription again under the new secret and revokes the ones it now
// refuses (see Handlers.Revoked). A refusal of the secret itself goes to
// Options.OnError.
func (c *Client) SetSecret(secret string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.secret = secret
	if cn := c.conn; cn != nil && cn.ready {
		c.sendSecret(cn)
	}
}

// Close stops the client: it says goodbye to the server (close code 1000),
// stops reconnecting, and returns once its goroutines are gone. When Close
// returns, no callback runs and none will start: a callback running on the
// client's goroutine is waited for, and queued events are dropped. The one
// exception is Close called from a callback, which cannot wait for its own
// caller: it returns at once, and no further callback starts after the
// calling one returns. Every call waits, also a second one made while the
// first is still closing. The error is always nil; it is there for
// io.Closer.
func (c *Client) Close() error {
	c.mu.Lock()
	first := !c.closed
	c.closed = true
	c.state = Closed
	cn := c.conn
	c.mu.Unlock()

	if first {
		c.cancel()
		if cn != nil {
			msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "client closed")
			_ = cn.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
			cn.ws.Close()
		}
	}
	<-c.done
	c.events.close()
	return nil
}

// setState records a state change and queues the OnState callback.
func (c *Client) setState(s State, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.setStateLocked(s, err)
}

func (c *Client) setStateLocked(s State, err error) {
	if c.closed {
		return
	}
	c.state = s
	if f := c.opts.OnState; f != nil {
		c.events.push(func() { f(s, err) })
	}
}

// reportLocked queues err for Options.OnError.
func (c *Client) reportLocked(err error) {
	if f := c.opts.OnError; f != nil {
		c.events.push(func() { f(err) })
	}
}

// run is the connection loop: connect, serve until the connection ends,
// wait for the backoff delay, again, until Close. first is an activated
// connection to serve first (from Dial), or nil.
func (c *Client) run(first *conn) {
	defer close(c.done)
	attempt := 0
	cn := first
	for {
		if cn == nil {
			c.setState(Connecting, nil)
			var err error
			if cn, err = c.connect(c.ctx); err != nil {
				if c.ctx.Err() != nil {
					return
				}
				c.setState(Disconnected, err)
				if !c.pause(c.backoff(attempt)) {
					return
				}
				attempt++
				continue
			}
			c.activate(cn)
		}
		err := c.serve(cn)
		c.mu.Lock()
		if cn.healthy(time.Now(), c.opts.HealthyAfter) {
			attempt = 0
		}
		c.mu.Unlock()
		cn = nil
		if c.ctx.Err() != nil {
			return
		}
		c.setState(Disconnected, err)
		if !c.pause(c.backoff(attempt)) {
			return
		}
		attempt++
	}
}

// pause waits for d, or returns false when the client is closed first.
func (c *Client) pause(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-c.ctx.Done():
		return false
	}
}

// backoff returns the delay before reconnect attempt n (0 for the first one
// after a healthy connection ended): uniform in [0, min(MaxBackoff,
// MinBackoff*2^n)].
func (c *Client) backoff(n int) time.Duration {
	lo, hi := c.opts.MinBackoff, c.opts.MaxBackoff
	ceil := lo
	for i := 0; i < n && ceil < hi; i++ {
		ceil *= 2
	}
	if ceil > hi {
		ceil = hi
	}
	if ceil <= 0 {
		return 0
	}
	if c.opts.jitter != nil {
		return c.opts.jitter(ceil)
	}
	return rand.N(ceil + 1)
}
