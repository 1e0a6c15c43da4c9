package esq

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nsqio/go-nsq"
	"github.com/sirupsen/logrus"
)

// producer publishes to one nsqd, speaking NSQ's protocol itself (see
// nsqwire.go) rather than through go-nsq's Producer, which in v1.1.0 races
// with itself when it reconnects after nsqd dropped an idle connection
// (connect writes the connection its exiting router goroutine still reads),
// or its Conn, which reads each response in two reads and allocates a
// Command per publish. Here a connection is never reconnected: once it
// fails, everything waiting on it fails and the next publish dials a new
// one. A PUB is written in one write; a goroutine per connection reads
// nsqd's answers through a buffer, hands each to the oldest waiting
// publish and answers heartbeats.
//
// Dialing happens on its own goroutine, never under a lock, and at most one
// dial per nsqd is in flight: an nsqd that does not answer (a black-holed
// host, a hung process) costs one dial, not one per publish in turn. While
// it is in flight, other publishes either fail over to the next nsqd or
// wait for it, bounded by their ctx (see publish).
type producer struct {
	addr      string
	log       logrus.FieldLogger
	heartbeat time.Duration // asked of nsqd; a connection silent for twice as long is dead

	// wsem orders writes, so pending is in the order nsqd answers. A
	// one-slot semaphore rather than a mutex, so that a publish waiting for
	// its turn can give up when its ctx ends. It is not mu, so that a write
	// stuck on a full socket (up to the write timeout) holds up other
	// writes only, not the answers being handed out.
	wsem chan struct{}

	mu       sync.Mutex // guards the fields below and each connection's pending
	cur      *producerConn
	dialing  *dialAttempt // the dial in flight, if any
	failed   error        // the last dial's error; nil once one succeeded
	failedAt time.Time
	stopped  bool
}

// producerConn is one connection's life: the publishes awaiting nsqd's
// answer, in the order they were written.
type producerConn struct {
	*nsqSession // w is written with the producer's wsem held
	// writeDeadline is the write deadline set on the connection, moved
	// with wsem held (see producerConn.publish).
	writeDeadline time.Time

	pending []chan error  // guarded by the producer's mu
	dead    bool          // retired: nothing more may be written to it; guarded by mu
	closed  chan struct{} // closed when its reading goroutine has ended
}

// dialAttempt is one dial in flight; done is closed when it ends, after pc
// or err is set.
type dialAttempt struct {
	done chan struct{}
	pc   *producerConn
	err  error
}

// redialInterval is how often a publish that prefers other nsqd starts a
// background dial to an nsqd whose last dial failed, to notice it is back.
const redialInterval = time.Second

// skipped is a publish that was not attempted on this nsqd, or failed on a
// connection that had died, for a reason another attempt may overcome: a
// dial in flight, a recently failed nsqd, a slow dial, a lost connection.
// NSQ.Publish tries the next nsqd, and comes back to this one (waiting) only
// when every nsqd failed.
type skipped struct{ err error }

func (s *skipped) Error() string { return s.err.Error() }
func (s *skipped) Unwrap() error { return s.err }

var errDialInFlight = errors.New("a dial to this nsqd is in flight")

func newProducer(addr string, log logrus.FieldLogger) *producer {
	return &producer{addr: addr, log: log, heartbeat: nsqHeartbeat, wsem: make(chan struct{}, 1)}
}

// publish sends body to topic and waits for nsqd's answer or ctx's end.
//
// With lastResort false, the publish prefers another nsqd to waiting: it
// returns a *skipped error at once when another publish's dial is in
// flight or the last dial failed (starting a background redial now and
// then), and waits for a dial it started itself at most the dial timeout.
// With lastResort true, it waits for the connection as long as ctx allows.
func (p *producer) publish(ctx context.Context, topic string, body []byte, lastResort bool) error {
	pc, err := p.conn(ctx, lastResort)
	if err != nil {
		return err
	}
	select {
	case p.wsem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	done := make(chan error, 1) // buffered: an answer after ctx ended blocks nobody
	p.mu.Lock()
	if pc.dead {
		p.mu.Unlock()
		<-p.wsem
		return &skipped{errors.New("esq: nsqd connection lost")}
	}
	pc.pending = append(pc.pending, done)
	p.mu.Unlock()
	err = pc.publish(topic, body)
	<-p.wsem
	if err != nil {
		pc.nc.Close() // a write that failed half way leaves the stream unusable
		p.mu.Lock()
		p.retire(pc, &skipped{err})
		p.mu.Unlock()
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// conn returns the live connection, dialing one if needed (see publish).
func (p *producer) conn(ctx context.Context, lastResort bool) (*producerConn, error) {
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	if pc := p.cur; pc != nil {
		p.mu.Unlock()
		return pc, nil
	}
	d := p.dialing
	switch {
	case d != nil && !lastResort:
		p.mu.Unlock()
		return nil, &skipped{errDialInFlight}
	case d == nil && !lastResort && p.failed != nil:
		// Known to be down: do not make this publish wait, but look again
		// now and then, in the background.
		err := p.failed
		if time.Since(p.failedAt) >= redialInterval {
			p.startDialLocked()
		}
		p.mu.Unlock()
		return nil, &skipped{fmt.Errorf("last dial failed: %w", err)}
	case d == nil:
		d = p.startDialLocked()
	}
	p.mu.Unlock()

	var slow <-chan time.Time
	if !lastResort {
		t := time.NewTimer(nsqDialTimeout)
		defer t.Stop()
		slow = t.C
	}
	select {
	case <-d.done:
		if d.err != nil {
			return nil, d.err
		}
		return d.pc, nil
	case <-slow:
		return nil, &skipped{fmt.Errorf("no connection within %s (the dial goes on in the background)", nsqDialTimeout)}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// startDialLocked starts dialing on a goroutine of its own. With p.mu held.
func (p *producer) startDialLocked() *dialAttempt {
	d := &dialAttempt{done: make(chan struct{})}
	p.dialing = d
	go p.dial(d)
	return d
}

func (p *producer) dial(d *dialAttempt) {
	var pc *producerConn
	s, err := dialNSQ(p.addr, p.heartbeat, nil)
	if err == nil {
		err = s.nc.SetDeadline(time.Time{})
		if err != nil {
			s.nc.Close()
		}
	}
	if err == nil {
		pc = &producerConn{nsqSession: s, closed: make(chan struct{})}
		go p.read(pc)
	}
	p.mu.Lock()
	p.dialing = nil
	discard := false
	switch {
	case err != nil:
		p.failed, p.failedAt = err, time.Now()
	case p.stopped: // Stop ran while we dialed
		err, discard = ErrClosed, true
	case pc.dead: // its reader failed already (retire found it not current yet)
		err = errors.New("esq: nsqd closed the connection right after the handshake")
		p.failed, p.failedAt = err, time.Now()
	default:
		p.cur, p.failed = pc, nil
		d.pc = pc
	}
	d.err = err
	p.mu.Unlock()
	if discard {
		pc.nc.Close()
		<-pc.closed // the read fails at once
	}
	close(d.done)
}

// publish writes one PUB, in one write.
func (pc *producerConn) publish(topic string, body []byte) error {
	// A write blocks only while the socket's buffer is full (nsqd not
	// reading): the deadline bounds that. Moved at most once per write
	// timeout rather than per write, it leaves each write between one and
	// two write timeouts.
	if now := time.Now(); pc.writeDeadline.Sub(now) < nsqWriteTimeout {
		pc.writeDeadline = now.Add(2 * nsqWriteTimeout)
		if err := pc.nc.SetWriteDeadline(pc.writeDeadline); err != nil {
			return err
		}
	}
	var size [4]byte
	binary.BigEndian.PutUint32(size[:], uint32(len(body)))
	pc.w.WriteString("PUB ")
	pc.w.WriteString(topic)
	pc.w.WriteByte('\n')
	pc.w.Write(size[:])
	pc.w.Write(body)
	return pc.w.Flush()
}

// read hands nsqd's answers on pc to the publishes waiting for them, and
// answers heartbeats, until the connection fails; then it retires pc.
func (p *producer) read(pc *producerConn) {
	defer close(pc.closed)
	err := p.readFrames(pc)
	pc.nc.Close()
	p.mu.Lock()
	stopped := p.stopped
	p.retire(pc, &skipped{fmt.Errorf("esq: nsqd connection lost: %w", err)})
	p.mu.Unlock()
	if !stopped {
		p.log.WithError(err).Debug("lost the connection to nsqd; the next publish dials again")
	}
}

func (p *producer) readFrames(pc *producerConn) error {
	return pc.readLoop(func() error { return p.nop(pc) }, func(frameType int32, data []byte) error {
		switch frameType {
		case nsq.FrameTypeResponse:
			p.answer(pc, nil)
		case nsq.FrameTypeError:
			// nsqd closes the connection after a fatal error: the read
			// that follows fails.
			p.answer(pc, fmt.Errorf("nsqd refused: %w", nsq.ErrProtocol{Reason: string(data)}))
		default:
			return fmt.Errorf("nsqd sent a frame of type %d to a producer", frameType)
		}
		return nil
	})
}

// nop answers a heartbeat. It waits for a write in progress, which its
// deadline bounds.
func (p *producer) nop(pc *producerConn) error {
	p.wsem <- struct{}{}
	defer func() { <-p.wsem }()
	if err := pc.nc.SetWriteDeadline(time.Now().Add(nsqWriteTimeout)); err != nil {
		return err
	}
	pc.writeDeadline = time.Time{} // the next publish sets its own
	pc.w.WriteString("NOP\n")
	return pc.w.Flush()
}

// retire stops using pc and fails every publish waiting on it. With p.mu
// held.
func (p *producer) retire(pc *producerConn, err error) {
	if p.cur == pc {
		p.cur = nil
	}
	pc.dead = true
	for _, ch := range pc.pending {
		ch <- err
	}
	pc.pending = nil
}

// answer hands nsqd's answer to the oldest waiting publish.
func (p *producer) answer(pc *producerConn, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(pc.pending) == 0 {
		return
	}
	ch := pc.pending[0]
	pc.pending = pc.pending[1:]
	ch <- err
}

// Stop fails waiting publishes, closes the connection and waits for its
// reading goroutine and for a dial in flight (at most the dial timeout),
// until ctx ends or at most 5s.
func (p *producer) Stop(ctx context.Context) {
	p.mu.Lock()
	p.stopped = true
	pc, d := p.cur, p.dialing
	if pc != nil {
		p.retire(pc, ErrClosed)
	}
	p.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if pc != nil {
		pc.nc.Close()
		select {
		case <-pc.closed:
		case <-ctx.Done():
		}
	}
	if d != nil {
		select {
		case <-d.done:
		case <-ctx.Done():
		}
	}
}
