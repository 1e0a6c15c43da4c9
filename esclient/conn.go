package esclient

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/shared"
)

// conn is one websocket connection. Its fields other than the write queue
// are guarded by Client.mu.
type conn struct {
	ws    *websocket.Conn
	ready bool // welcomed; the secret and subscriptions were queued
	// silence is how long the connection may go without a frame before the
	// client presumes it dead: derived from the welcome's heartbeatMs, or
	// Options.ReadTimeout when the server announced no heartbeat.
	silence   time.Duration
	heartbeat time.Duration // the server's announced interval, 0 if none

	// maxSubs is the welcome's limits.maxSubscriptions (0: no limit). held
	// counts the keys this connection holds on the server: subscribes
	// queued (or waiting for a rate-limited retry) minus unsubscribes
	// queued, refusals and revocations. The server processes requests in
	// order, so counting when a request is queued matches its count.
	maxSubs int
	held    int

	welcomedAt time.Time // see healthy

	nextRef uint64
	pending map[string]request          // requests awaiting their ack or error
	lastSeq map[shared.EntityKey]uint64 // the seq last applied per key
	// unsubs counts unacknowledged unsubscribes per key. While one is in
	// flight, frames for a key subscribed again may come from either the old
	// or the new server-side subscription, whose seq may start lower, so no
	// frame is dropped for its seq until the unsubscribe's ack arrives.
	unsubs map[shared.EntityKey]int
	timers map[*time.Timer]struct{} // retries of rate-limited requests

	wmu      sync.Mutex
	queue    [][]byte
	inFlight int   // requests written and not answered yet; guarded by wmu
	pace     pacer // used by writeLoop only
	wake     chan struct{}
	stop     chan struct{}
	wdone    chan struct{}
}

// request is a sent request that carried a ref.
type request struct {
	action shared.Action
	key    shared.EntityKey
	sub    *sub // the subscription a subscribe was for
}

// inbound is any server frame.
type inbound struct {
	Type        string   `json:"type"`
	HeartbeatMs float64  `json:"heartbeatMs"` // welcome
	Limits      struct { // welcome
		MaxSubscriptions  float64 `json:"maxSubscriptions"`
		MessagesPerSecond float64 `json:"messagesPerSecond"`
		MessageBurst      float64 `json:"messageBurst"`
	} `json:"limits"`
	Key     *shared.EntityKey `json:"key"`
	Seq     uint64            `json:"seq"`
	Version string            `json:"version"` // state frames
	IDs     []string          `json:"ids"`     // rows, of a collection
	Rows    []json.RawMessage `json:"rows"`
	Base    string            `json:"base"` // diff
	Upsert  []upsert          `json:"upsert"`
	Remove  []string          `json:"remove"`
	Order   []string          `json:"order"`
	Ref     string            `json:"ref"`
	Code    shared.ErrorCode  `json:"code"`
	Message string            `json:"message"`
	Reason  string            `json:"reason"`
}

// outbound is a client request.
type outbound struct {
	Action shared.Action `json:"action"`
	Body   any           `json:"body"`
	Ref    string        `json:"ref"`
}

// connect dials, checks the subprotocol and waits for the welcome frame,
// all within HandshakeTimeout. On success the connection is the client's
// current one, not yet ready.
func (c *Client) connect(ctx context.Context) (*conn, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.HandshakeTimeout)
	defer cancel()
	d := websocket.Dialer{Proxy: websocket.DefaultDialer.Proxy, HandshakeTimeout: c.opts.HandshakeTimeout}
	if c.opts.Dialer != nil {
		d = *c.opts.Dialer
	}
	// The client offers only the envelope protocol and refuses a server
	// that does not accept it.
	d.Subprotocols = []string{shared.Subprotocol}
	ws, resp, err := d.DialContext(ctx, c.url, c.opts.Header)
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("esclient: dial %s: %w (HTTP %s)", c.url, err, resp.Status)
		}
		return nil, fmt.Errorf("esclient: dial %s: %w", c.url, err)
	}
	if ws.Subprotocol() != shared.Subprotocol {
		ws.Close()
		return nil, ErrNotEnvelope
	}
	cn := &conn{
		ws:      ws,
		pending: make(map[string]request),
		lastSeq: make(map[shared.EntityKey]uint64),
		unsubs:  make(map[shared.EntityKey]int),
		timers:  make(map[*time.Timer]struct{}),
		wake:    make(chan struct{}, 1),
		stop:    make(chan struct{}),
		wdone:   make(chan struct{}),
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		ws.Close()
		return nil, ErrClosed
	}
	c.conn = cn // Close may now interrupt the wait for the welcome
	c.mu.Unlock()

	deadline, _ := ctx.Deadline()
	_ = ws.SetReadDeadline(deadline)
	stopWatch := context.AfterFunc(ctx, func() { _ = ws.SetReadDeadline(time.Now()) })
	defer stopWatch()
	_, data, err := ws.ReadMessage()
	if err == nil {
		var f inbound
		if jerr := json.Unmarshal(data, &f); jerr != nil || f.Type != "welcome" {
			err = fmt.Errorf("esclient: expected a welcome frame, got %.200q", data)
		} else {
			cn.welcomed(&f, c.opts.ReadTimeout)
		}
	} else {
		err = fmt.Errorf("esclient: waiting for welcome: %w", err)
	}
	if err != nil {
		c.mu.Lock()
		if c.conn == cn {
			c.conn = nil
		}
		c.mu.Unlock()
		ws.Close()
		return nil, err
	}
	return cn, nil
}

// heartbeatSlack is added to twice the server's heartbeat interval to make
// the silence limit: room for a late timer on the server and for network
// jitter, so that one delayed heartbeat is not taken for a dead connection.
const heartbeatSlack = time.Second

// welcomed applies the welcome frame's announcements to the connection.
func (cn *conn) welcomed(f *inbound, readTimeout time.Duration) {
	cn.silence = readTimeout
	// A server that sends heartbeats promises a frame at least every
	// heartbeatMs: two missed beats mean the connection is dead, although
	// TCP may not notice for many minutes (a half-open connection after a
	// laptop sleep or a lost NAT entry). Absent (an older server): no such
	// promise, so only ReadTimeout, which relies on the server's pings.
	if ms := f.HeartbeatMs; ms > 0 && ms < float64(24*time.Hour/time.Millisecond) {
		cn.heartbeat = time.Duration(ms * float64(time.Millisecond))
		cn.silence = 2*cn.heartbeat + heartbeatSlack
	}
	if n := f.Limits.MaxSubscriptions; n >= 1 && n < 1<<31 {
		cn.maxSubs = int(n)
	}
	cn.pace = newPacer(f.Limits.MessagesPerSecond, f.Limits.MessageBurst)
}

// pacer keeps a connection's requests within the token bucket the server
// announced (limits.messagesPerSecond and messageBurst), so that a client
// resubscribing many keys after a reconnect sends a burst and then a steady
// stream instead of a flood the server refuses with rate_limited (and, if
// it goes on, closes with 1008). The server's bucket is full when the
// welcome arrives, as is the pacer's. The pacer keeps one token in reserve
// and refills at 90% of the announced rate: requests can reach the server
// closer together than they were sent, and the margin absorbs that.
type pacer struct {
	rate     float64 // tokens per second; 0: no pacing
	capacity float64
	tokens   float64
	last     time.Time
}

func newPacer(rate, burst float64) pacer {
	if !(rate > 0) || math.IsInf(rate, 0) {
		return pacer{} // an older server: it announces no rate
	}
	if !(burst >= 1) || math.IsInf(burst, 0) {
		burst = 1 // a rate without a burst: one request at a time
	}
	capacity := max(1, math.Floor(burst)-1)
	return pacer{rate: 0.9 * rate, capacity: capacity, tokens: capacity, last: time.Now()}
}

// take takes a token and returns 0, or returns how long until one is
// available.
func (p *pacer) take(now time.Time) time.Duration {
	if p.rate <= 0 {
		return 0
	}
	p.tokens = min(p.capacity, p.tokens+now.Sub(p.last).Seconds()*p.rate)
	p.last = now
	if p.tokens >= 1 {
		p.tokens--
		return 0
	}
	return time.Duration(math.Ceil((1 - p.tokens) / p.rate * float64(time.Second)))
}

// maxInFlight bounds the requests awaiting their ack or error. The server
// bounds the answers it holds for a connection and drops one whose unread
// answers pile up, taking it for a client that does not read them. That
// bound need not cover a full burst (this package was written against an
// esweb that queued 64 answers with a default burst of 100, and a client
// sending a full burst to a busy server was dropped although it read
// everything); a small window keeps a reading client clear of it whatever
// the burst.
const maxInFlight = 32

// healthy reports whether the connection proved it works, so that the
// reconnect backoff may start afresh when it ends: it stayed open for
// after (Options.HealthyAfter) since its welcome. Answers prove nothing: a
// server that welcomes the client and acks its subscriptions can still drop
// it right away (overloaded, refusing it, or sending a frame the client
// cannot read), and must see the client back off further with every
// attempt, not reconnect at the first delay forever. With Client.mu held.
func (cn *conn) healthy(now time.Time, after time.Duration) bool {
	return !cn.welcomedAt.IsZero() && now.Sub(cn.welcomedAt) >= after
}

// activate starts a welcomed connection's writer and sends the secret and
// every subscription; the client is then Connected.
func (c *Client) activate(cn *conn) {
	go cn.writeLoop(c.opts.WriteTimeout)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.conn != cn {
		return // Close has closed the socket: serve returns at once
	}
	cn.ready = true
	cn.welcomedAt = time.Now()
	c.setStateLocked(Connected, nil)
	// Requests are processed in order: the secret applies to every
	// subscription that follows it.
	if c.secret != "" {
		c.sendSecret(cn)
	}
	// Oldest first, so that when the server allows fewer keys than the
	// client holds, the ones refused are the newest, whatever the map's
	// order.
	subs := make([]*sub, 0, len(c.subs))
	for _, s := range c.subs {
		subs = append(subs, s)
	}
	slices.SortFunc(subs, func(a, b *sub) int { return cmp.Compare(a.order, b.order) })
	for _, s := range subs {
		c.subscribeOn(cn, s)
	}
}

// subscribeOn sends s's subscribe on cn, unless the server's
// maxSubscriptions would be exceeded: the subscription then ends with a
// too_many_subscriptions error, as if the server had refused it, without
// spending a request the server would refuse anyway. With Client.mu held.
func (c *Client) subscribeOn(cn *conn, s *sub) bool {
	if cn.maxSubs > 0 && cn.held >= cn.maxSubs {
		serr := &ServerError{
			Code:    shared.CodeTooManySubscriptions,
			Message: fmt.Sprintf("not sent: the server allows %d subscriptions per connection (limits.maxSubscriptions) and the client holds them all", cn.maxSubs),
			Action:  shared.ActionSubscribe,
			Key:     s.key,
		}
		c.end(s)
		for _, h := range s.handles {
			c.events.push(func() { h.failed(serr, c.opts.OnError) })
		}
		return false
	}
	cn.held++
	s.resyncing = false // this subscribe's answer brings the key up to date
	c.sendSubscribe(cn, s)
	return true
}

// serve reads an activated connection's frames until it ends, then releases
// it. It returns why the connection ended.
func (c *Client) serve(cn *conn) error {
	defer func() {
		c.mu.Lock()
		if c.conn == cn {
			c.conn = nil
		}
		for t := range cn.timers {
			t.Stop()
		}
		clear(cn.timers)
		c.mu.Unlock()
		close(cn.stop)
		cn.ws.Close()
		<-cn.wdone
	}()

	readTimeout := cn.silence
	ws := cn.ws
	_ = ws.SetReadDeadline(time.Now().Add(readTimeout))
	ws.SetPingHandler(func(data string) error {
		_ = ws.SetReadDeadline(time.Now().Add(readTimeout))
		err := ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(c.opts.WriteTimeout))
		var ne net.Error
		if errors.Is(err, websocket.ErrCloseSent) || (errors.As(err, &ne) && ne.Timeout()) {
			return nil // as gorilla's default handler: the read loop will notice
		}
		return err
	})
	for {
		_, data, err := ws.ReadMessage()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				if cn.heartbeat > 0 {
					return fmt.Errorf("esclient: no frame for %s although the server promised a heartbeat every %s: connection presumed dead: %w", readTimeout, cn.heartbeat, err)
				}
				return fmt.Errorf("esclient: no frame for %s (Options.ReadTimeout): connection presumed dead: %w", readTimeout, err)
			}
			return err
		}
		_ = ws.SetReadDeadline(time.Now().Add(readTimeout))
		c.handle(cn, data)
	}
}

// send queues a request for the writer. With Client.mu held, so requests
// go out in the order the client's state changed.
func (c *Client) send(cn *conn, action shared.Action, body any, req request) {
	cn.nextRef++
	ref := strconv.FormatUint(cn.nextRef, 10)
	req.action = action
	cn.pending[ref] = req
	b, err := json.Marshal(outbound{Action: action, Body: body, Ref: ref})
	if err != nil { // a string or an EntityKey: cannot happen
		panic(fmt.Sprintf("esclient: encode request: %v", err))
	}
	cn.wmu.Lock()
	cn.queue = append(cn.queue, b)
	cn.wmu.Unlock()
	select {
	case cn.wake <- struct{}{}:
	default:
	}
}

func (c *Client) sendSecret(cn *conn) {
	c.send(cn, shared.ActionSecret, c.secret, request{})
}

func (c *Client) sendSubscribe(cn *conn, s *sub) {
	body := subscribeBody{Entity: s.key.Entity, ID: s.key.ID}
	if s.state.has {
		body.Version = s.state.version // "unchanged" or a diff, if the server can
	}
	c.send(cn, shared.ActionSubscribe, body, request{key: s.key, sub: s})
}

func (c *Client) sendUnsubscribe(cn *conn, key shared.EntityKey) {
	delete(cn.lastSeq, key)
	cn.held--
	cn.unsubs[key]++
	c.send(cn, shared.ActionUnsubscribe, key, request{key: key})
}

// writeLoop writes queued requests, in order, paced (see pacer) and with at
// most maxInFlight awaiting an answer, until stop. A failed write closes
// the connection, which ends the read loop and so the connection.
func (cn *conn) writeLoop(timeout time.Duration) {
	defer close(cn.wdone)
	paused := time.NewTimer(time.Hour)
	paused.Stop()
	defer paused.Stop()
	for {
		select {
		case <-cn.stop:
			return
		case <-cn.wake:
		case <-paused.C:
		}
		for {
			cn.wmu.Lock()
			if len(cn.queue) == 0 || cn.inFlight >= maxInFlight {
				cn.wmu.Unlock()
				break // woken by the next request or answer
			}
			if wait := cn.pace.take(time.Now()); wait > 0 {
				cn.wmu.Unlock()
				paused.Reset(wait)
				break
			}
			b := cn.queue[0]
			cn.queue[0] = nil
			cn.queue = cn.queue[1:]
			cn.inFlight++
			cn.wmu.Unlock()
			_ = cn.ws.SetWriteDeadline(time.Now().Add(timeout))
			if err := cn.ws.WriteMessage(websocket.TextMessage, b); err != nil {
				cn.ws.Close()
				return
			}
		}
	}
}

// freeSlot frees a place in the window of requests awaiting an answer.
func (cn *conn) freeSlot() {
	cn.wmu.Lock()
	cn.inFlight--
	more := len(cn.queue) > 0
	cn.wmu.Unlock()
	if more {
		select {
		case cn.wake <- struct{}{}:
		default:
		}
	}
}

// after runs f with Client.mu held after d, unless the connection has ended
// by then. With Client.mu held.
func (c *Client) after(cn *conn, d time.Duration, f func()) {
	var t *time.Timer
	t = time.AfterFunc(d, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if _, ok := cn.timers[t]; !ok {
			return // stopped with its connection
		}
		delete(cn.timers, t)
		if c.conn == cn && !c.closed {
			f()
		}
	})
	cn.timers[t] = struct{}{}
}

// handle applies one server frame.
func (c *Client) handle(cn *conn, data []byte) {
	var f inbound
	if err := json.Unmarshal(data, &f); err != nil {
		c.mu.Lock()
		c.reportLocked(fmt.Errorf("esclient: undecodable frame %.200q: %w", data, err))
		c.mu.Unlock()
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != cn || c.closed {
		return
	}
	switch f.Type {
	case "rows", "gone", "diff", "unchanged":
		if f.Key != nil {
			c.applyState(cn, &f)
		}
	case "revoked":
		if f.Key != nil {
			c.revoke(cn, *f.Key, f.Reason)
		}
	case "ack":
		c.acked(cn, f.Ref)
	case "error":
		c.refused(cn, &f)
	case "heartbeat":
		// Nothing to do: reading it pushed the read deadline back.
	default:
		// "welcome" again, or a frame type from a newer server: ignored, as
		// the protocol asks.
	}
}

// applyState applies a state frame (rows, gone, diff, unchanged) to the
// key's subscription and hands the new state to its callbacks, unless the
// frame is older than the state already applied. A diff from a state the
// client does not hold is not applied: the key is subscribed again, with
// the version the client holds, and the answer brings it up to date.
func (c *Client) applyState(cn *conn, f *inbound) {
	key := *f.Key
	s := c.subs[key]
	if s == nil {
		return // unsubscribed meanwhile
	}
	if cn.unsubs[key] == 0 {
		if last, ok := cn.lastSeq[key]; ok && f.Seq <= last {
			return
		}
	}
	var changes []Change
	switch f.Type {
	case "unchanged":
		if !s.state.has || s.state.version != f.Version {
			// The server takes the client for holding a state it does not
			// hold: ask for everything (a subscribe without a version),
			// keeping the rows to tell the application what changed.
			s.state.version = ""
			c.resubscribe(cn, s)
			return
		}
		cn.lastSeq[key] = f.Seq
		s.resyncing = false
		return // nothing new for the application
	case "diff":
		var ok bool
		changes, ok = s.state.applyDiff(f.Version, diffFrame{Base: f.Base, Upsert: f.Upsert, Remove: f.Remove, Order: f.Order})
		if !ok {
			if !s.resyncing {
				c.resubscribe(cn, s)
			}
			return
		}
		if f.Version == f.Base && len(changes) == 0 {
			// The key came back to the rows the client holds (after states
			// it never got): nothing new for the application.
			cn.lastSeq[key] = f.Seq
			s.resyncing = false
			return
		}
	default:
		rows, ids := f.Rows, f.IDs
		if f.Type == "gone" {
			rows, ids = nil, nil
		} else if rows == nil {
			rows = []json.RawMessage{}
		}
		if ids != nil && len(ids) != len(rows) {
			ids = nil // not a collection state this client understands
		}
		changes = s.state.replace(f.Version, ids, rows)
	}
	cn.lastSeq[key] = f.Seq
	s.resyncing = false
	snap := Snapshot{Rows: s.state.rows, IDs: s.state.ids, Changes: changes, Version: s.state.version}
	for _, h := range s.handles {
		c.events.push(func() { h.deliver(snap) })
	}
}

// resubscribe sends s's subscribe again on cn, with the version the client
// holds, to get the key's state after a diff it could not apply.
func (c *Client) resubscribe(cn *conn, s *sub) {
	c.resyncs.Add(1)
	s.resyncing = true
	c.sendSubscribe(cn, s)
}

// revoke ends a subscription the server withdrew.
func (c *Client) revoke(cn *conn, key shared.EntityKey, reason string) {
	s := c.subs[key]
	if s == nil {
		return
	}
	cn.held-- // the server removed it
	c.end(s)
	for _, h := range s.handles {
		c.events.push(func() { h.revoked(reason) })
	}
}

// acked handles an ack. Only an unsubscribe's ack matters: after it, no frame
// of the old server-side subscription can follow.
func (c *Client) acked(cn *conn, ref string) {
	req, ok := cn.pending[ref]
	if !ok {
		return
	}
	delete(cn.pending, ref)
	cn.freeSlot()
	if req.action == shared.ActionUnsubscribe {
		c.unsubDone(cn, req.key)
	}
}

func (c *Client) unsubDone(cn *conn, key shared.EntityKey) {
	if cn.unsubs[key]--; cn.unsubs[key] <= 0 {
		delete(cn.unsubs, key)
		delete(cn.lastSeq, key) // a subscription made since then starts afresh
	}
}

// refused handles an error frame.
func (c *Client) refused(cn *conn, f *inbound) {
	serr := &ServerError{Code: f.Code, Message: f.Message}
	if f.Key != nil {
		serr.Key = *f.Key
	}
	req, ok := cn.pending[f.Ref]
	if f.Ref == "" || !ok {
		c.reportLocked(serr)
		return
	}
	delete(cn.pending, f.Ref)
	cn.freeSlot()
	serr.Action = req.action
	if req.action != shared.ActionSecret {
		serr.Key = req.key
	}
	retry := c.backoff(2)
	switch req.action {
	case shared.ActionSubscribe:
		s := req.sub
		if c.subs[s.key] != s {
			return // unsubscribed meanwhile: nothing to report
		}
		if f.Code == shared.CodeRateLimited {
			c.reportLocked(serr)
			c.after(cn, retry, func() {
				if c.subs[s.key] == s {
					c.sendSubscribe(cn, s)
				}
			})
			return
		}
		cn.held-- // refused: the server does not hold it
		c.end(s)
		for _, h := range s.handles {
			c.events.push(func() { h.failed(serr, c.opts.OnError) })
		}
	case shared.ActionUnsubscribe:
		c.unsubDone(cn, req.key)
		if f.Code == shared.CodeRateLimited {
			cn.held++ // the server still holds it until the retry
			key := req.key
			c.after(cn, retry, func() {
				if c.subs[key] == nil {
					c.sendUnsubscribe(cn, key)
				}
			})
		}
		c.reportLocked(serr)
	case shared.ActionSecret:
		if f.Code == shared.CodeRateLimited {
			c.after(cn, retry, func() { c.sendSecret(cn) })
		}
		c.reportLocked(serr)
	default:
		c.reportLocked(serr)
	}
}
