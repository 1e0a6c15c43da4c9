package esweb

import (
	"context"
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

// conn is one websocket connection. Its life: the bridge client is built,
// then the connection is registered with the server, then its reader starts;
// the reader owns reads for the connection's whole life and, when it ends,
// cancels the connection's context, closes the client and the socket.
//
// gorilla/websocket only does the handshake: frames are read by reader.go,
// and writes (writer.go) bypass gorilla's writer: frames are encoded
// once per update and written by whoever has them, the fan-out directly when
// the socket takes them at once, or the connection's flusher, a goroutine
// that runs only while a write would block.
//
// Idle connections are what a server holds most of, so a conn keeps little:
// no logger entry (logger builds one when there is something to say), no
// ticker (the server's heartbeat loop writes pings), no write buffer, and a
// read buffer of ReadBufferSize (gorilla's Conn is not kept).
type conn struct {
	s      *Server
	nc     net.Conn
	fr     frameReader // only the reader touches it
	client *esbridge.Client
	info   *shared.Connection
	ctx    context.Context // &hctx: carries info, for the hooks; done when the connection ends
	hctx   hookContext

	envelope bool // the client negotiated shared.Subprotocol

	// order is held by the reader while it applies a request and queues
	// its answer, and by whoever takes updates to write them, so an ack is
	// never written after the update its request caused.
	order sync.Mutex

	// Token bucket of the request rate limit; only the reader touches it.
	tokens    float64
	refilled  time.Time
	throttled time.Duration // waited since the last request that needed no wait
	kicked    bool          // closed for exceeding the rate: requests are ignored

	writeState
}

// logger returns a log entry naming the connection.
func (c *conn) logger() logrus.FieldLogger {
	return c.s.log.WithFields(logrus.Fields{"conn": c.info.ID, "remote": c.info.Request.RemoteAddr})
}

func (c *conn) readPump() {
	defer func() {
		c.hctx.end() // also tells awaitCloseReply that the reader is gone
		c.client.Close()
		c.end()
		c.s.forget(c)
		c.s.wg.Done()
	}()
	pongWait := c.s.opts.PongWait
	_ = c.nc.SetReadDeadline(time.Now().Add(pongWait))
	closing := false // this reader began the close: read only to its end
	for {
		op, data, err := c.fr.next()
		if err != nil {
			var perr protocolError
			switch {
			case errors.Is(err, errTooBig):
				if !closing {
					c.s.stats.tooLarge.Add(1)
					c.logger().Warnf("closing connection: frame larger than the %d byte limit", c.s.opts.ReadLimit)
					closing = c.closeFromReader(websocket.CloseMessageTooBig, "")
				}
				// Read past the frame, to the client's answer to the
				// close: a socket closed on unread data is reset, and the
				// client may lose the close frame before reading it.
				if closing && c.fr.skip() == nil {
					continue
				}
			case errors.As(err, &perr):
				c.logger().WithError(err).Warn("closing connection")
				c.closeFromReader(websocket.CloseProtocolError, string(perr))
				c.drain() // what follows cannot be read as frames
			default:
				c.logger().WithError(err).Debug("connection read ended")
			}
			return
		}
		switch op {
		case opPing:
			c.send(appendFrame(nil, opPong, data), true)
		case opPong:
		case opClose:
			// The client closes, or answers our close. Either way our
			// close frame (the client's code, as RFC 6455 asks, unless
			// ours went first) is through before the socket closes; the
			// client sends nothing after its close frame.
			code, err := parseClose(data)
			if err != nil {
				c.logger().WithError(err).Warn("closing connection")
				c.closeFromReader(websocket.CloseProtocolError, string(err.(protocolError)))
			} else {
				c.closeFromReader(code, "")
			}
			c.awaitCloseSent()
			return
		default:
			if c.kicked || closing {
				continue // closing: read on until the client answers or the socket is cut
			}
			if !c.pace() {
				return
			}
			if !c.kicked {
				c.handleOffStack(data)
			}
		}
		if !closing {
			_ = c.nc.SetReadDeadline(time.Now().Add(pongWait))
		}
	}
}

// maxThrottle is how long a connection may be kept waiting by the rate
// limit, in all, without one request that needed no wait: past it, it is
// closed with 1008. 10 s; tests shorten it.
var maxThrottle atomic.Int64

func init() { maxThrottle.Store(int64(10 * time.Second)) }

// pace applies the request rate limit: a request over it is not dropped
// (the raw dialect could not say so) but waits for its token, which slows
// the connection's reads down to the limit. A connection that is held back
// continuously for maxThrottle is closed (kicked). pace reports false when
// the connection ended while it waited.
func (c *conn) pace() bool {
	const cost = 1.0
	rate, burst := float64(c.s.opts.MessagesPerSecond), float64(c.s.opts.MessageBurst)
	now := time.Now()
	c.tokens = min(burst, c.tokens+now.Sub(c.refilled).Seconds()*rate)
	c.refilled = now
	if c.tokens >= cost {
		c.tokens -= cost
		c.throttled = 0
		return true
	}
	wait := time.Duration((cost - c.tokens) / rate * float64(time.Second))
	c.s.stats.rateLimited.Add(1)
	if c.throttled += wait; c.throttled > time.Duration(maxThrottle.Load()) {
		c.logger().Warn("closing connection: it keeps exceeding the request rate")
		c.closeWith(websocket.ClosePolicyViolation, "request rate exceeded")
		c.kicked = true
		return true
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
	case <-c.ctx.Done():
		return false
	}
	c.tokens, c.refilled = 0, now.Add(wait)
	return true
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
		if err := c.client.SubscribeFrom(req.key, req.version); err != nil {
			switch {
			case errors.Is(err, esbridge.ErrEntityNotServed):
				return refuse(shared.CodeUnknownEntity, "entity type %q is not served here", req.key.Entity)
			case errors.Is(err, shared.ErrForbidden):
				c.s.stats.forbidden.Add(1)
				// The hook's reason stays in the server log: it may say
				// more about the data than the client should learn.
				c.logger().WithError(err).Info("subscription refused by Authorize")
				return refuse(shared.CodeForbidden, "not allowed to subscribe to %s", req.key)
			}
			return refuse(shared.CodeInternal, "subscribe %s: %v", req.key, err)
		}
	case shared.ActionSecret:
		// A secret re-authorizes every subscription: the tokens for that
		// are owed, and the next requests wait for them.
		c.tokens -= float64(c.client.Subscriptions()) / 10
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

// sendControl writes a control frame (welcome, ack, error) now, or after
// what is already waiting.
func (c *conn) sendControl(v any) {
	b, err := textFrame(v)
	if err != nil {
		c.logger().WithError(err).Error("cannot encode control frame")
		return
	}
	c.send(b, true)
}

func (c *conn) passThrough(data []byte) {
	defer func() {
		if r := recover(); r != nil {
			c.logger().Errorf("pass-through function panicked: %v", r)
		}
	}()
	if c.s.opts.PassThrough == nil {
		c.logger().Debug("dropping frame without action: no pass-through function configured")
		return
	}
	c.s.opts.PassThrough(c.ctx, data)
}
