package esq

import (
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
// the next Publish dials a new one.
type producer struct {
	addr string
	cfg  *nsq.Config
	log  nsqLogger

	// wmu orders dialing and writing, so pending is in the order nsqd
	// answers. It is not mu: go-nsq calls OnIOError from inside a failed
	// WriteCommand, and that callback takes mu.
	wmu     sync.Mutex
	mu      sync.Mutex // guards cur, stopped and each connection's pending
	cur     *producerConn
	stopped bool
}

// producerConn is one connection's life: the publishes awaiting nsqd's
// answer, in the order they were written.
type producerConn struct {
	c       *nsq.Conn
	pending []chan error
	closed  chan struct{}
}

func newProducer(addr string, cfg *nsq.Config, log nsqLogger) *producer {
	return &producer{addr: addr, cfg: cfg, log: log}
}

// Publish sends body to topic and waits for nsqd's answer.
func (p *producer) Publish(topic string, body []byte) error {
	done := make(chan error, 1)
	p.wmu.Lock()
	p.mu.Lock()
	stopped, pc := p.stopped, p.cur
	p.mu.Unlock()
	if stopped {
		p.wmu.Unlock()
		return ErrClosed
	}
	if pc == nil {
		pc = &producerConn{closed: make(chan struct{})}
		pc.c = nsq.NewConn(p.addr, p.cfg, &producerDelegate{p, pc})
		pc.c.SetLogger(p.log, nsq.LogLevelInfo, "(%s)")
		if _, err := pc.c.Connect(); err != nil {
			p.wmu.Unlock()
			pc.c.Close()
			return err
		}
		p.mu.Lock()
		if p.stopped { // Stop ran while we dialed
			p.mu.Unlock()
			p.wmu.Unlock()
			pc.c.Close()
			return ErrClosed
		}
		p.cur = pc
		p.mu.Unlock()
	}
	p.mu.Lock()
	pc.pending = append(pc.pending, done)
	p.mu.Unlock()
	err := pc.c.WriteCommand(nsq.Publish(topic, body))
	p.wmu.Unlock()
	if err != nil {
		p.mu.Lock()
		p.retire(pc, err) // go-nsq's OnIOError has usually done it already
		p.mu.Unlock()
		pc.c.Close()
	}
	return <-done
}

// retire stops using pc and fails every publish waiting on it. With p.mu
// held.
func (p *producer) retire(pc *producerConn, err error) {
	if p.cur == pc {
		p.cur = nil
	}
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

// Stop fails waiting publishes, closes the connection and waits (bounded)
// for its goroutines.
func (p *producer) Stop() {
	p.mu.Lock()
	p.stopped = true
	pc := p.cur
	if pc != nil {
		p.retire(pc, ErrClosed)
	}
	p.mu.Unlock()
	if pc != nil {
		pc.c.Close()
		select {
		case <-pc.closed:
		case <-time.After(5 * time.Second):
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
	d.p.retire(d.pc, err)
	d.p.mu.Unlock()
	c.Close()
}

func (d *producerDelegate) OnClose(*nsq.Conn) {
	d.p.mu.Lock()
	d.p.retire(d.pc, errors.New("esq: nsqd connection closed"))
	d.p.mu.Unlock()
	close(d.pc.closed)
}
