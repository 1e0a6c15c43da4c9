package esq

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nsqio/go-nsq"
)

// producer publishes to one nsqd over go-nsq's Conn. It exists instead of
// go-nsq's Producer because that one, in v1.1.0, races with itself when it
// reconnects after nsqd dropped an idle connection (connect writes the
// connection its exiting router goroutine still reads). Here a connection
// is never reconnected: once it fails, everything waiting on it fails and
// the next publish dials a new one.
//
// Dialing happens on its own goroutine, never under a lock, and at most one
// dial per nsqd is in flight: an nsqd that does not answer (a black-holed
// host, a hung process) costs one dial, not one per publish in turn. While
// it is in flight, other publishes either fail over to the next nsqd or
// wait for it, bounded by their ctx (see publish).
type producer struct {
	addr string
	cfg  *nsq.Config
	log  nsqLogger

	// wsem orders writes, so pending is in the order nsqd answers. A
	// one-slot semaphore rather than a mutex, so that a publish waiting for
	// its turn can give up when its ctx ends. It is not mu: go-nsq calls
	// OnIOError from inside a failed WriteCommand, and that callback takes
	// mu.
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
	c       *nsq.Conn
	pending []chan error
	dead    bool // retired: nothing more may be written to it
	closed  chan struct{}
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

func newProducer(addr string, cfg *nsq.Config, log nsqLogger) *producer {
	return &producer{addr: addr, cfg: cfg, log: log, wsem: make(chan struct{}, 1)}
}

// publish sends body to topic and waits for nsqd's answer or ctx's end.
//
// With lastResort false, the publish prefers another nsqd to waiting: it
// returns a *skipped error at once when another publish's dial is in
// flight or the last dial failed (starting a background redial now and
// then), and waits for a dial it started itself at most the dial timeout
// (go-nsq's connect can otherwise hang for its 60s read timeout on an nsqd
// that accepts but never answers). With lastResort true, it waits for the
// connection as long as ctx allows.
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
	err = pc.c.WriteCommand(nsq.Publish(topic, body))
	<-p.wsem
	if err != nil {
		p.mu.Lock()
		p.retire(pc, &skipped{err}) // go-nsq's OnIOError has usually done it already
		p.mu.Unlock()
		pc.c.Close()
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
		t := time.NewTimer(p.cfg.DialTimeout)
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
		return nil, &skipped{fmt.Errorf("no connection within %s (the dial goes on in the background)", p.cfg.DialTimeout)}
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
	pc := &producerConn{closed: make(chan struct{})}
	pc.c = nsq.NewConn(p.addr, p.cfg, &producerDelegate{p, pc})
	pc.c.SetLogger(p.log, nsq.LogLevelInfo, "(%s)")
	_, err := pc.c.Connect()
	if err != nil {
		pc.c.Close()
	}
	p.mu.Lock()
	p.dialing = nil
	discard := false
	switch {
	case err != nil:
		p.failed, p.failedAt = err, time.Now()
	case p.stopped: // Stop ran while we dialed
		err, discard = ErrClosed, true
	default:
		p.cur, p.failed = pc, nil
		d.pc = pc
	}
	d.err = err
	p.mu.Unlock()
	if discard {
		pc.c.Close()
		select { // let its goroutines end before Stop returns
		case <-pc.closed:
		case <-time.After(5 * time.Second):
		}
	}
	close(d.done)
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
// goroutines and for a dial in flight, until ctx ends or at most 5s. A
// dial to an nsqd that accepts but never answers cannot be interrupted
// (go-nsq's Conn offers no way); Stop gives up on it, and it ends with
// go-nsq's read timeout.
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
		pc.c.Close()
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

// producerDelegate receives one connection's events. Heartbeats are
// answered by go-nsq's Conn itself.
type producerDelegate struct {
	p  *producer
	pc *producerConn
}

func (d *producerDelegate) OnResponse(*nsq.Conn, []byte) { d.p.answer(d.pc, nil) }
func (d *producerDelegate) OnError(_ *nsq.Conn, b []byte) {
	d.p.answer(d.pc, fmt.Errorf("nsqd refused: %w", nsq.ErrProtocol{Reason: string(b)}))
}
func (d *producerDelegate) OnMessage(*nsq.Conn, *nsq.Message)         {}
func (d *producerDelegate) OnMessageFinished(*nsq.Conn, *nsq.Message) {}
func (d *producerDelegate) OnMessageRequeued(*nsq.Conn, *nsq.Message) {}
func (d *producerDelegate) OnBackoff(*nsq.Conn)                       {}
func (d *producerDelegate) OnContinue(*nsq.Conn)                      {}
func (d *producerDelegate) OnResume(*nsq.Conn)                        {}
func (d *producerDelegate) OnHeartbeat(*nsq.Conn)                     {}

func (d *producerDelegate) OnIOError(c *nsq.Conn, err error) {
	d.p.mu.Lock()
	d.p.retire(d.pc, &skipped{err})
	d.p.mu.Unlock()
	c.Close()
}

func (d *producerDelegate) OnClose(*nsq.Conn) {
	d.p.mu.Lock()
	d.p.retire(d.pc, &skipped{errors.New("esq: nsqd connection closed")})
	d.p.mu.Unlock()
	close(d.pc.closed)
}
