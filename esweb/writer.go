package esweb

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/esbridge"
)

// writeState is a connection's write side. Two paths put bytes on the
// socket, and wmu makes them take turns:
//
//   - direct: whoever has a frame (the fan-out, the reader with an ack, the
//     heartbeat loop) writes it at once with a non-blocking write when
//     nothing is waiting before it. This is the common case: no goroutine
//     to wake, no deadline to arm, one system call per frame.
//   - the flusher: a goroutine started when a write would block (the
//     client reads slowly, or the socket is not a plain one). It writes
//     what is waiting: the backlog of frames, then the client's pending
//     updates (latest-wins, taken from the bridge), several in one writev
//     of up to 64 KiB under a WriteWait deadline, and exits when nothing is
//     left.
type writeState struct {
	direct func([]byte) (int, error) // non-blocking write; nil: flusher only

	wmu          sync.Mutex
	backlog      [][]byte // frames (or a frame's unwritten tail) waiting, in order
	backlogBytes int
	flushing     bool   // a flusher goroutine runs
	again        bool   // something arrived while it ran
	closeFrame   []byte // set once the connection is closing: written last
	ended        bool   // the socket is closed or failed: write nothing more

	// Once closeFrame is set: closeBy is when the close frame must be
	// through (WriteWait after the close began; unix nanoseconds, read by
	// the flusher without wmu), and closeSent is closed when it is (or
	// when the connection ended first).
	closeBy       atomic.Int64
	closeSent     chan struct{}
	closeSentDone bool
}

// send writes frame now if nothing is waiting and the socket takes it without
// blocking. Otherwise a control frame (queueable) joins the backlog, while an
// update is declined (false), so it stays in the bridge's latest-wins queue.
func (c *conn) send(frame []byte, queueable bool) bool {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.ended || c.closeFrame != nil {
		return true // the connection is going: nothing more to say
	}
	if c.flushing || len(c.backlog) > 0 || c.direct == nil {
		if !queueable {
			c.kickFlusherLocked()
			return false
		}
		if c.backlogBytes+len(frame) > maxBacklogBytes {
			c.s.stats.slowClients.Add(1)
			c.logger().Warn("dropping connection: it does not read the answers to its requests")
			c.failLocked(nil)
			return true
		}
		c.queueLocked(frame)
		return true
	}
	n, err := c.direct(frame)
	if err != nil {
		c.failLocked(err)
		return true
	}
	if n < len(frame) {
		c.queueLocked(frame[n:]) // frames are immutable: keep the tail, no copy
	}
	return true
}

// maxBacklogBytes bounds the control frames (acks, errors, pongs) waiting
// for a client that does not read: past it, the client is cut. It counts
// bytes the socket would not take, so a client that reads normally never
// comes near it, however many requests it sends at once.
const maxBacklogBytes = 1 << 20

// queueLocked adds a frame to the backlog and makes sure the flusher runs.
// With wmu held.
func (c *conn) queueLocked(frame []byte) {
	c.backlog = append(c.backlog, frame)
	c.backlogBytes += len(frame)
	c.kickFlusherLocked()
}

// kickFlusherLocked starts the flusher, or tells the running one to go round
// again. With wmu held.
func (c *conn) kickFlusherLocked() {
	if c.ended {
		return
	}
	if c.flushing {
		c.again = true
		return
	}
	c.flushing = true
	c.s.wg.Add(1)
	go c.flush()
}

// signal is the bridge client's OnReady: updates wait to be taken.
func (c *conn) signal() {
	c.wmu.Lock()
	c.kickFlusherLocked()
	c.wmu.Unlock()
}

// writeNow is the bridge client's direct writer: the fan-out offers an
// update, and it is written at once if the connection can take it.
func (c *conn) writeNow(u *esbridge.Update) bool {
	if !c.order.TryLock() {
		return false // a request is being applied: its answer must go first
	}
	defer c.order.Unlock()
	frame := c.frames(u)
	if len(frame) == 0 {
		return true // nothing to write for it in this dialect
	}
	return c.send(frame, false)
}

// frames returns the bytes of u in this connection's dialect.
func (c *conn) frames(u *esbridge.Update) []byte {
	if u.Revoked {
		c.logger().WithField("key", u.Key.String()).Info("subscription revoked")
		if !c.envelope {
			return nil // the raw protocol cannot say it; the pushes just stop
		}
		b, _ := textFrame(revokedFrame{Type: "revoked", Key: u.Key, Reason: "access withdrawn"})
		return b
	}
	if c.envelope {
		// Built by hand from rows the bridge checked: encoding cannot fail.
		return u.Memo(envelopeID{}, prepareEnvelope).([]byte)
	}
	return u.Full().Memo(rawFramesID{}, prepareRaw).([]byte)
}

// flush is the flusher goroutine.
func (c *conn) flush() {
	defer c.s.wg.Done()
	var (
		bufs, chunk net.Buffers
		batch       []*esbridge.Update
	)
	for {
		// Under order, so that an ack queued by the reader is taken
		// before the update its request caused.
		c.order.Lock()
		c.wmu.Lock()
		bufs = append(bufs[:0], c.backlog...)
		clear(c.backlog)
		c.backlog, c.backlogBytes, c.again = c.backlog[:0], 0, false
		closing := c.closeFrame
		c.wmu.Unlock()
		overflowed := closing == nil && c.client.Overflowed()
		if closing == nil && !overflowed {
			batch = c.client.Take(batch[:0])
			for _, u := range batch {
				if f := c.frames(u); len(f) > 0 {
					bufs = append(bufs, f)
				}
			}
			clear(batch)
		}
		c.order.Unlock()
		if overflowed {
			c.s.stats.slowClients.Add(1)
			c.logger().Warn("dropping connection: too far behind (MaxPendingBytes)")
			// The close frame goes after what was just taken from the
			// backlog, which may start with the tail of a frame a direct
			// write began: dropping that would leave the client waiting
			// for the rest of the frame, and never reading the close.
			c.wmu.Lock()
			closing = c.closeFrameLocked(websocket.ClosePolicyViolation, "client too slow")
			c.wmu.Unlock()
		}
		if closing != nil {
			bufs = append(bufs, closing)
		}
		if len(bufs) > 0 {
			if err := c.writeChunked(bufs, &chunk); err != nil {
				c.wmu.Lock()
				c.failLocked(err)
				c.flushing = false
				c.wmu.Unlock()
				return
			}
		}
		if closing != nil {
			// The close frame is the last thing written: the end of
			// the stream (FIN) follows it, so that the peer, once it
			// has read it, sees the server will say nothing more.
			if cw, ok := c.nc.(interface{ CloseWrite() error }); ok {
				_ = cw.CloseWrite()
			}
			c.wmu.Lock()
			c.closeSentLocked()
			c.wmu.Unlock()
			c.awaitCloseReply()
			return
		}
		c.wmu.Lock()
		if !c.again && len(c.backlog) == 0 || c.ended {
			// A deadline left armed would fail the next direct write once
			// it passes.
			_ = c.nc.SetWriteDeadline(time.Time{})
			c.flushing = false
			c.wmu.Unlock()
			return
		}
		c.wmu.Unlock()
	}
}

// writeChunk is the most the flusher writes under one deadline.
const writeChunk = 64 << 10

// writeChunked writes bufs (consuming it) in chunks of at most writeChunk
// bytes, each under a fresh WriteWait deadline: WriteWait bounds a wait with
// no progress, so a client that reads steadily, however large the batch
// and however slowly next to it, is never dropped. chunk is scratch space
// kept between calls.
func (c *conn) writeChunked(bufs net.Buffers, chunk *net.Buffers) error {
	for len(bufs) > 0 {
		part, n := (*chunk)[:0], 0
		for len(bufs) > 0 && n < writeChunk {
			b := bufs[0]
			if room := writeChunk - n; len(b) > room {
				part = append(part, b[:room])
				bufs[0] = b[room:]
				break
			}
			part = append(part, b)
			n += len(b)
			bufs[0] = nil
			bufs = bufs[1:]
		}
		*chunk = part
		deadline := time.Now().Add(c.s.opts.WriteWait)
		if by := c.closeBy.Load(); by != 0 && by < deadline.UnixNano() {
			deadline = time.Unix(0, by) // closing: the close frame is due then
		}
		_ = c.nc.SetWriteDeadline(deadline)
		if _, err := part.WriteTo(c.nc); err != nil { // consumes part, not *chunk
			return err
		}
	}
	return nil
}

// closeWith closes the connection with a close frame (unless one is set
// already): written after what is already waiting, all within WriteWait,
// then the client has WriteWait to answer before the socket is closed. It
// reports false if the connection has already ended.
func (c *conn) closeWith(code int, reason string) bool {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closeFrameLocked(code, reason) == nil {
		return false
	}
	c.kickFlusherLocked()
	return true
}

// closeFrameLocked sets the connection's close frame unless one is set, and
// returns the one to write (nil once the connection has ended). With wmu
// held.
func (c *conn) closeFrameLocked(code int, reason string) []byte {
	if c.ended {
		return nil
	}
	if c.closeFrame == nil {
		var payload []byte // no code: the answer to a close frame without one
		if code != websocket.CloseNoStatusReceived {
			payload = websocket.FormatCloseMessage(code, closeReason(reason))
		}
		c.closeFrame = appendFrame(nil, opClose, payload)
		c.closeBy.Store(time.Now().Add(c.s.opts.WriteWait).UnixNano())
		c.closeSent = make(chan struct{})
		switch code {
		case websocket.ClosePolicyViolation:
			c.s.stats.protocolViolations.Add(1)
		case websocket.CloseProtocolError:
			c.s.stats.protocolErrors.Add(1)
		}
	}
	return c.closeFrame
}

// closeSentLocked tells awaitCloseSent that the close frame is through, or
// will never be. With wmu held.
func (c *conn) closeSentLocked() {
	if c.closeSent != nil && !c.closeSentDone {
		c.closeSentDone = true
		close(c.closeSent)
	}
}

// closeFromReader starts closing the connection from the reader (the client
// closed it, or broke the protocol), as closeWith does, and ends the
// reader's reads by the time the close frame is due too. It reports false
// if the connection has already ended.
func (c *conn) closeFromReader(code int, reason string) bool {
	if !c.closeWith(code, reason) {
		return false
	}
	_ = c.nc.SetReadDeadline(time.Unix(0, c.closeBy.Load()))
	return true
}

// awaitCloseSent waits until the close frame is through, the connection has
// ended, or the close's time is up.
func (c *conn) awaitCloseSent() {
	c.wmu.Lock()
	by, sent := c.closeBy.Load(), c.closeSent
	c.wmu.Unlock()
	if sent == nil {
		return
	}
	t := time.NewTimer(time.Until(time.Unix(0, by)))
	defer t.Stop()
	select {
	case <-sent:
	case <-t.C:
	}
}

// drain reads and discards what the client sends until it closes its end or
// the close's time is up, then waits for the close frame to be through:
// closing a socket with unread data resets the connection, and the client
// may then lose the close frame before reading it (browsers report 1006
// instead of the code).
func (c *conn) drain() {
	_, _ = io.Copy(io.Discard, c.fr.br)
	c.awaitCloseSent()
}

// awaitCloseReply gives the client WriteWait to read up to the close frame
// and answer it (the reader then ends), and closes the socket.
func (c *conn) awaitCloseReply() {
	t := time.NewTimer(c.s.opts.WriteWait)
	defer t.Stop()
	select {
	case <-c.hctx.Done(): // the reader has returned
	case <-t.C:
	}
	c.wmu.Lock()
	c.flushing = false
	c.failLocked(nil)
	c.wmu.Unlock()
}

// failLocked ends the connection after a failed write (err) or a decision to
// cut it (nil): the socket is closed, which also ends the reader. With wmu
// held.
func (c *conn) failLocked(err error) {
	if c.ended {
		return
	}
	c.ended = true
	c.closeSentLocked()
	if err != nil {
		c.dropped(err)
	}
	c.backlog, c.backlogBytes = nil, 0
	_ = c.nc.Close()
}

// end is called by the reader when it returns.
func (c *conn) end() {
	c.wmu.Lock()
	c.failLocked(nil)
	c.wmu.Unlock()
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

// maxCloseReason is the most a close frame's reason may hold: a control
// frame's payload is at most 125 bytes (RFC 6455, 5.5), 2 of them the code.
const maxCloseReason = 123

// closeReason cuts reason to maxCloseReason bytes, at a rune boundary so it
// stays UTF-8.
func closeReason(reason string) string {
	if len(reason) <= maxCloseReason {
		return reason
	}
	cut := maxCloseReason
	for cut > 0 && !utf8.RuneStart(reason[cut]) {
		cut--
	}
	return reason[:cut]
}
