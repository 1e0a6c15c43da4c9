package esclient

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
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
	ready bool // welcomed; the secret and subscriptions were sent
	// silence is how long the connection may go without a frame before the
	// client presumes it dead: derived from the welcome's heartbeatMs, or
	// Options.ReadTimeout when the server announced no heartbeat.
	silence   time.Duration
	heartbeat time.Duration // the server's announced interval, 0 if none

	nextRef uint64
	pending map[string]request          // requests awaiting their ack or error
	lastSeq map[shared.EntityKey]uint64 // the seq last applied per key
	// unsubs counts unacknowledged unsubscribes per key. While one is in
	// flight, frames for a key subscribed again may come from either the old
	// or the new server-side subscription, whose seq may start lower, so no
	// frame is dropped for its seq until the unsubscribe's ack arrives.
	unsubs map[shared.EntityKey]int
	timers map[*time.Timer]struct{} // retries of rate-limited requests

	wmu   sync.Mutex
	queue [][]byte
	wake  chan struct{}
	stop  chan struct{}
	wdone chan struct{}
}

// request is a sent request that carried a ref.
type request struct {
	action shared.Action
	key    shared.EntityKey
	sub    *sub // the subscription a subscribe was for
}

// inbound is any server frame.
type inbound struct {
	Type        string            `json:"type"`
	HeartbeatMs float64           `json:"heartbeatMs"` // welcome
	Key         *shared.EntityKey `json:"key"`
	Seq         uint64            `json:"seq"`
	Rows        []json.RawMessage `json:"rows"`
	Ref         string            `json:"ref"`
	Code        shared.ErrorCode  `json:"code"`
	Message     string            `json:"message"`
	Reason      string            `json:"reason"`
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
	d.Subprotocols = []string{Subprotocol}
	ws, resp, err := d.DialContext(ctx, c.url, c.opts.Header)
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("esclient: dial %s: %w (HTTP %s)", c.url, err, resp.Status)
		}
		return nil, fmt.Errorf("esclient: dial %s: %w", c.url, err)
	}
	if ws.Subprotocol() != Subprotocol {
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
	c.setStateLocked(Connected, nil)
	if c.secret != "" {
		c.sendSecret(cn)
	}
	for _, s := range c.subs {
		c.sendSubscribe(cn, s)
	}
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
	c.send(cn, shared.ActionSubscribe, s.key, request{key: s.key, sub: s})
}

func (c *Client) sendUnsubscribe(cn *conn, key shared.EntityKey) {
	delete(cn.lastSeq, key)
	cn.unsubs[key]++
	c.send(cn, shared.ActionUnsubscribe, key, request{key: key})
}

// writeLoop writes queued requests until stop. A failed write closes the
// connection, which ends the read loop and so the connection.
func (cn *conn) writeLoop(timeout time.Duration) {
	defer close(cn.wdone)
	for {
		select {
		case <-cn.stop:
			return
		case <-cn.wake:
		}
		cn.wmu.Lock()
		q := cn.queue
		cn.queue = nil
		cn.wmu.Unlock()
		for _, b := range q {
			_ = cn.ws.SetWriteDeadline(time.Now().Add(timeout))
			if err := cn.ws.WriteMessage(websocket.TextMessage, b); err != nil {
				cn.ws.Close()
				return
			}
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
	case "rows", "gone":
		if f.Key != nil {
			c.applyState(cn, *f.Key, f.Seq, f.Type == "gone", f.Rows)
		}
	case "revoked":
		if f.Key != nil {
			c.revoke(*f.Key, f.Reason)
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

// applyState delivers a rows or gone frame to the key's callbacks, unless it
// is older than the state already applied.
func (c *Client) applyState(cn *conn, key shared.EntityKey, seq uint64, gone bool, rows []json.RawMessage) {
	s := c.subs[key]
	if s == nil {
		return // unsubscribed meanwhile
	}
	if cn.unsubs[key] == 0 {
		if last, ok := cn.lastSeq[key]; ok && seq <= last {
			return
		}
	}
	cn.lastSeq[key] = seq
	if gone {
		rows = nil
	} else if rows == nil {
		rows = []json.RawMessage{}
	}
	s.has, s.gone, s.rows = true, gone, rows
	for _, h := range s.handles {
		c.events.push(func() { h.deliver(gone, rows) })
	}
}

// revoke ends a subscription the server withdrew.
func (c *Client) revoke(key shared.EntityKey, reason string) {
	s := c.subs[key]
	if s == nil {
		return
	}
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
	serr.Action = req.action
	if req.action != shared.ActionSecret {
		serr.Key = req.key
	}
	retry := backoff(c.opts.MinBackoff, c.opts.MaxBackoff, 2)
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
		c.end(s)
		for _, h := range s.handles {
			c.events.push(func() { h.failed(serr, c.opts.OnError) })
		}
	case shared.ActionUnsubscribe:
		c.unsubDone(cn, req.key)
		if f.Code == shared.CodeRateLimited {
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
