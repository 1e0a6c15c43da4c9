package esweb

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/shared"
)

// conn is one websocket connection: readPump owns reads for the
// connection's whole life; writes are done by a writer goroutine that runs
// only while something is due (gorilla/websocket allows one reader and one
// writer at a time).
//
// Idle connections are what a server holds most of, so a conn keeps little:
// no logger entry (logger builds one when there is something to say), no
// ticker (the server's ping loop sets pingDue), no preallocated control
// queue.
type conn struct {
	s      *Server
	ws     *websocket.Conn
	client *esbridge.Client
	info   *shared.Connection
	ctx    context.Context // carries info, for the hooks

	// order is held by the reader while it applies a request and queues
	// its ack, and by the writer while it takes updates, so an ack is never
	// written after the update its request caused.
	order sync.Mutex

	// Token bucket of the request rate limit; only the reader touches it.
	tokens   float64
	refilled time.Time

	envelope bool // the client negotiated Subprotocol

	ctrlMu   sync.Mutex
	controls [][]byte // welcome, acks and errors, written before updates

	// The writer runs only while there is something to write (an idle
	// connection parks no goroutine but its reader). wmu guards the flags
	// that start it and tell it to go round again.
	wmu      sync.Mutex
	writing  bool // a writer goroutine is running
	again    bool // something arrived while it was running
	finished bool // the connection is over: start no writer
	pingDue  atomic.Bool
	kickMu   sync.Mutex
	kicked   *kick         // a reason to close the connection, from the reader
	readDone chan struct{} // closed when readPump returns
}

// kick is a close code and reason the writer sends before hanging up.
type kick struct {
	code   int
	reason string
}

// maxControlBacklog bounds the acks and errors waiting to be written.
const maxControlBacklog = 64

// logger returns a log entry naming the connection.
func (c *conn) logger() logrus.FieldLogger {
	return c.s.log.WithFields(logrus.Fields{"conn": c.info.ID, "remote": c.info.Request.RemoteAddr})
}

// signal makes sure a writer runs after this call: it starts one, or tells
// the running one to go round again.
func (c *conn) signal() {
	c.wmu.Lock()
	if c.writing || c.finished {
		c.again = true
		c.wmu.Unlock()
		return
	}
	c.writing = true
	c.s.wg.Add(1)
	c.wmu.Unlock()
	go c.writer()
}

func (c *conn) readPump() {
	defer func() {
		close(c.readDone)
		c.client.Close()
		c.ws.Close() // fails a write still blocked on this connection
		c.wmu.Lock()
		c.finished = true
		c.wmu.Unlock()
		c.s.forget(c)
		c.s.wg.Done()
	}()
	pongWait := c.s.opts.PongWait
	c.ws.SetReadLimit(c.s.opts.ReadLimit)
	_ = c.ws.SetReadDeadline(time.Now().Add(pongWait))
	c.ws.SetPongHandler(func(string) error { return c.ws.SetReadDeadline(time.Now().Add(pongWait)) })
	for {
		_, data, err := c.ws.ReadMessage()
		if err != nil {
			switch {
			case errors.Is(err, websocket.ErrReadLimit):
				c.s.stats.tooLarge.Add(1)
				c.logger().Warnf("closing connection: frame larger than the %d byte limit", c.s.opts.ReadLimit)
			case websocket.IsCloseError(err, websocket.CloseNormalClosure, websocket.CloseGoingAway, websocket.CloseNoStatusReceived):
			default:
				c.logger().WithError(err).Debug("connection read ended")
			}
			return
		}
		now := time.Now()
		_ = c.ws.SetReadDeadline(now.Add(pongWait))
		if !c.allow(now) {
			c.s.stats.rateLimited.Add(1)
			c.refused(peekRef(data), nil, refuse(shared.CodeRateLimited, "more than %d requests per second; request dropped", c.s.opts.MessagesPerSecond))
			continue
		}
		c.handleOffStack(data)
	}
}

// handleOffStack handles a frame on a short-lived goroutine and waits for
// it. Decoding and subscribing need a deep stack; done on the reader's own
// goroutine, that stack would stay grown for the connection's whole life
// (the runtime only shrinks a stack that is mostly unused, and a reader
// parked in Read uses too much of a grown one). Requests are rare next to
// reads, so the extra goroutine per request is cheap.
func (c *conn) handleOffStack(data []byte) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.handle(data)
	}()
	<-done
}

// allow takes a token from the connection's rate limit bucket.
func (c *conn) allow(now time.Time) bool {
	burst := float64(c.s.opts.MessageBurst)
	c.tokens = min(burst, c.tokens+now.Sub(c.refilled).Seconds()*float64(c.s.opts.MessagesPerSecond))
	c.refilled = now
	if c.tokens < 1 {
		return false
	}
	c.tokens--
	return true
}

// peekRef returns the ref of a frame the server will not otherwise decode,
// so a rate_limited error can still be correlated.
func peekRef(data []byte) string {
	var r struct {
		Ref string `json:"ref"`
	}
	_ = json.Unmarshal(data, &r)
	return r.Ref
}

// handle applies one client frame. A refused request is answered with an
// error frame in the envelope protocol and logged in the raw one (which has
// no error frame); either way the connection and its other subscriptions
// carry on.
func (c *conn) handle(data []byte) {
	c.order.Lock()
	defer c.order.Unlock()
	req, err := parseRequest(data, c.s.opts.MaxIDLength)
	if err == nil {
		err = c.apply(req, data)
	}
	if err != nil {
		c.refused(req.ref, req.errorKey(), err)
		return
	}
	if req.ref != "" && c.envelope {
		c.sendControl(ackFrame{Type: "ack", Ref: req.ref})
	}
}

func (c *conn) apply(req parsedRequest, data []byte) *requestError {
	switch req.action {
	case shared.ActionUnsubscribe:
		c.client.Unsubscribe(req.key)
	case shared.ActionSubscribe:
		if n := c.client.Subscriptions(); n >= c.s.opts.MaxSubscriptions && !c.client.Subscribed(req.key) {
			c.s.stats.subscriptionLimit.Add(1)
			return refuse(shared.CodeTooManySubscriptions, "connection already holds %d keys", n)
		}
		if err := c.client.Subscribe(req.key); err != nil {
			switch {
			case errors.Is(err, esbridge.ErrEntityNotServed):
				return refuse(shared.CodeUnknownEntity, "entity type %q is not served here", req.key.Entity)
			case errors.Is(err, esbridge.ErrForbidden):
				c.s.stats.forbidden.Add(1)
				// The hook's reason stays in the server log: it may say
				// more about the data than the client should learn.
				c.logger().WithError(err).Info("subscription refused by Authorize")
				return refuse(shared.CodeForbidden, "not allowed to subscribe to %s", req.key)
			}
			return refuse(shared.CodeInternal, "subscribe %s: %v", req.key, err)
		}
	case shared.ActionSecret:
		c.client.SetSecret(req.secret)
	case "":
		c.passThrough(data)
	}
	return nil
}

func (c *conn) refused(ref string, key *shared.EntityKey, err *requestError) {
	c.logger().WithField("code", err.code).Warnf("request refused: %s", err.msg)
	if c.envelope {
		c.sendControl(errorFrame{Type: "error", Ref: ref, Code: err.code, Message: err.msg, Key: key})
	}
}

// sendControl queues a control frame (welcome, ack, error) for the writer. A
// client that sends requests faster than it reads the answers fills the
// bounded queue and is disconnected: its memory must stay bounded.
func (c *conn) sendControl(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		c.logger().WithError(err).Error("cannot encode control frame")
		return
	}
	c.ctrlMu.Lock()
	full := len(c.controls) >= maxControlBacklog
	if !full {
		c.controls = append(c.controls, b)
	}
	c.ctrlMu.Unlock()
	if full {
		c.logger().Warn("dropping connection: it does not read the answers to its requests")
		c.kick(websocket.ClosePolicyViolation, "too many unread control frames")
		return
	}
	c.signal()
}

// kick asks the writer to close the connection with code; the first reason
// wins.
func (c *conn) kick(code int, reason string) {
	c.kickMu.Lock()
	if c.kicked == nil {
		c.kicked = &kick{code, reason}
	}
	c.kickMu.Unlock()
	c.signal()
}

func (c *conn) passThrough(data []byte) {
	defer func() {
		if r := recover(); r != nil {
			c.logger().Errorf("pass-through function panicked: %v", r)
		}
	}()
	switch {
	case c.s.opts.PassThroughContext != nil:
		c.s.opts.PassThroughContext(c.ctx, data)
	case c.s.opts.PassThrough != nil:
		c.s.opts.PassThrough(c.client.Secret(), data)
	default:
		c.logger().Debug("dropping frame without action: no pass-through function configured")
	}
}

// writer writes whatever is due, then goes round again while signal says
// more arrived, and exits when there is nothing left: an idle connection
// holds no writer goroutine.
func (c *conn) writer() {
	defer c.s.wg.Done()
	for {
		c.wmu.Lock()
		c.again = false
		c.wmu.Unlock()
		if !c.flush() {
			c.wmu.Lock()
			c.finished, c.writing = true, false
			c.wmu.Unlock()
			c.ws.Close() // ends readPump's ReadMessage
			return
		}
		c.wmu.Lock()
		if !c.again || c.finished {
			c.writing = false
			c.wmu.Unlock()
			return
		}
		c.wmu.Unlock()
	}
}

// flush writes what is due: a close frame when the server shuts down or the
// reader kicked the connection, a ping, then control frames and updates. It
// returns false when the connection must end.
func (c *conn) flush() bool {
	select {
	case <-c.readDone:
		return false
	case <-c.s.closing: // Server.Close: say 1001 and go
		c.closeWith(websocket.CloseGoingAway, errShutdown.Error())
		return false
	default:
	}
	c.kickMu.Lock()
	k := c.kicked
	c.kickMu.Unlock()
	if k != nil {
		c.s.stats.protocolViolations.Add(1)
		c.closeWith(k.code, k.reason)
		return false
	}
	if c.client.Overflowed() {
		c.s.stats.slowClients.Add(1)
		c.logger().Warn("dropping connection: too far behind (MaxPendingBytes)")
		c.closeWith(websocket.ClosePolicyViolation, "client too slow")
		return false
	}
	if c.pingDue.Swap(false) {
		if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(c.s.opts.WriteWait)); err != nil {
			c.dropped(err)
			return false
		}
	}
	// Controls first, and taken together with the updates under order, so
	// an ack always precedes the update its request caused.
	c.order.Lock()
	batch := c.client.Take(nil)
	controls := c.drainControls(nil)
	c.order.Unlock()
	for _, b := range controls {
		if err := c.write(websocket.TextMessage, b); err != nil {
			return false
		}
	}
	for _, u := range batch {
		if err := c.writeUpdate(u); err != nil {
			c.dropped(err)
			return false
		}
	}
	return true
}

// drainControls appends the queued control frames to buf.
func (c *conn) drainControls(buf [][]byte) [][]byte {
	c.ctrlMu.Lock()
	defer c.ctrlMu.Unlock()
	buf = append(buf, c.controls...)
	clear(c.controls)
	c.controls = c.controls[:0]
	return buf
}

func (c *conn) write(messageType int, b []byte) error {
	_ = c.ws.SetWriteDeadline(time.Now().Add(c.s.opts.WriteWait))
	err := c.ws.WriteMessage(messageType, b)
	if err != nil {
		c.dropped(err)
	}
	return err
}

// dropped logs and counts a connection lost to a failed write; a timeout
// means the client stopped reading.
func (c *conn) dropped(err error) {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.s.stats.slowClients.Add(1)
		c.logger().Info("dropping connection: client did not read within WriteWait")
		return
	}
	c.logger().WithError(err).Debug("dropping connection: write failed")
}

// closeWith sends a close frame and gives the client a moment to answer the
// close handshake before the connection is dropped.
func (c *conn) closeWith(code int, reason string) {
	msg := websocket.FormatCloseMessage(code, reason)
	_ = c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(c.s.opts.WriteWait))
	select {
	case <-c.readDone:
	case <-time.After(time.Second):
	}
}

func (c *conn) writeUpdate(u *esbridge.Update) error {
	if u.Revoked {
		c.logger().WithField("key", u.Key.String()).Info("subscription revoked")
		if !c.envelope {
			return nil // the raw protocol cannot say it; the pushes just stop
		}
		b, _ := json.Marshal(revokedFrame{Type: "revoked", Key: u.Key, Reason: "access withdrawn"})
		_ = c.ws.SetWriteDeadline(time.Now().Add(c.s.opts.WriteWait))
		return c.ws.WriteMessage(websocket.TextMessage, b)
	}
	var frames []*websocket.PreparedMessage
	if c.envelope {
		if pm := u.Memo(envelopeID{}, prepareEnvelope).(*websocket.PreparedMessage); pm != nil {
			frames = []*websocket.PreparedMessage{pm}
		}
	} else {
		frames = u.Memo(rawFramesID{}, prepareRaw).([]*websocket.PreparedMessage)
	}
	for _, f := range frames {
		_ = c.ws.SetWriteDeadline(time.Now().Add(c.s.opts.WriteWait))
		if err := c.ws.WritePreparedMessage(f); err != nil {
			return err
		}
	}
	return nil
}
