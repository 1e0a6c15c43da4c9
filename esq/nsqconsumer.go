package esq

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nsqio/go-nsq"
	"github.com/sirupsen/logrus"
)

// nsqConsumer receives one topic on one channel from every nsqd it is
// connected to. It speaks NSQ's TCP protocol itself instead of using go-nsq's
// Consumer, because a notification is small and frequent and go-nsq spends
// more on carrying it than the bridge spends on acting on it: each message
// costs go-nsq two reads (size, then body), a hand-off from its reading
// goroutine to a handler goroutine and another to a writing goroutine, and
// a FIN written and flushed on its own. Here the reading goroutine calls
// the handler itself (the Queue's callbacks must not block), reads through
// a buffer, and acknowledges in batches: FINs collect in the write buffer
// and go out when half of MaxInFlight are waiting or finDelay after the
// first (nsqd keeps sending while fewer than MaxInFlight are unacknowledged,
// and redelivers only after its message timeout, a minute by default).
//
// A lost connection is redialled every reconnect interval: the configured
// nsqd directly, or whatever nsqlookupd lists for the topic (polled at the
// same interval). The NSQ queue's watcher turns lost and regained
// connections into onLoss calls, from connections and closes.
type nsqConsumer struct {
	topic, channel string
	maxInFlight    int
	handle         func(body []byte) // called on a connection's reading goroutine
	log            logrus.FieldLogger
	// targets returns the nsqd TCP addresses to be connected to; nil in
	// tests that dial by hand.
	targets   func() ([]string, error)
	reconnect time.Duration
	heartbeat time.Duration // asked of nsqd; a connection silent for twice as long is dead

	mu      sync.Mutex
	conns   map[string]*consumerConn // by address, once subscribed
	dialing map[string]bool
	stopped bool

	stopping chan struct{}
	done     chan struct{} // closed once stop has waited for every goroutine
	wg       sync.WaitGroup

	// closes counts connections lost other than by stop: a connection lost
	// and regained between two of the watcher's ticks leaves the count of
	// connections unchanged.
	closes atomic.Uint64
}

// finDelay is how long a FIN may wait in the buffer for others.
const finDelay = 10 * time.Millisecond

var errAlreadyConnected = errors.New("esq: already connected to this nsqd")

func newNSQConsumer(topic, channel string, maxInFlight int, reconnect time.Duration,
	targets func() ([]string, error), handle func([]byte), log logrus.FieldLogger) *nsqConsumer {
	return &nsqConsumer{
		topic: topic, channel: channel, maxInFlight: maxInFlight, handle: handle, log: log,
		targets: targets, reconnect: reconnect, heartbeat: nsqHeartbeat,
		conns:    make(map[string]*consumerConn),
		dialing:  make(map[string]bool),
		stopping: make(chan struct{}),
		done:     make(chan struct{}),
	}
}

// start connects to every target and from then on redials every reconnect
// interval whatever target it is not connected to. With strict, an nsqd
// that could not be reached now is an error (the configured nsqd); without,
// only reaching none of them is (nsqlookupd may list an nsqd that is gone).
func (c *nsqConsumer) start(strict bool) error {
	var errs []error
	connected := 0
	if addrs, err := c.targets(); err != nil && len(addrs) == 0 {
		errs = append(errs, err)
	} else {
		for _, addr := range addrs {
			if err := c.connect(addr); err != nil {
				errs = append(errs, fmt.Errorf("nsqd %s: %w", addr, err))
				continue
			}
			connected++
		}
	}
	c.wg.Add(1)
	go c.maintain()
	if len(errs) > 0 && (strict || connected == 0) {
		return errors.Join(errs...)
	}
	return nil
}

// maintain redials, every reconnect interval (with 10% jitter, so that
// servers restarted together do not poll nsqlookupd together), the targets
// it holds no connection to.
func (c *nsqConsumer) maintain() {
	defer c.wg.Done()
	for {
		jitter := time.Duration(float64(c.reconnect) * 0.1 * rand.Float64())
		select {
		case <-c.stopping:
			return
		case <-time.After(c.reconnect + jitter):
		}
		addrs, err := c.targets()
		if err != nil {
			c.log.WithError(err).Debug("finding nsqd for the topic")
		}
		for _, addr := range addrs {
			if err := c.connect(addr); err != nil && !errors.Is(err, errAlreadyConnected) && !errors.Is(err, ErrClosed) {
				c.log.WithError(err).Debugf("nsqd %s still unreachable", addr)
			}
		}
	}
}

// connections returns how many nsqd the consumer is subscribed on.
func (c *nsqConsumer) connections() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.conns)
}

// connect dials addr, subscribes and starts reading, unless a connection to
// addr exists or is being dialled (errAlreadyConnected).
func (c *nsqConsumer) connect(addr string) error {
	c.mu.Lock()
	switch {
	case c.stopped:
		c.mu.Unlock()
		return ErrClosed
	case c.conns[addr] != nil || c.dialing[addr]:
		c.mu.Unlock()
		return errAlreadyConnected
	}
	c.dialing[addr] = true
	c.mu.Unlock()

	cc, err := c.dial(addr)

	c.mu.Lock()
	delete(c.dialing, addr)
	if err == nil && c.stopped {
		err = ErrClosed
		cc.nc.Close()
	}
	if err == nil {
		c.conns[addr] = cc
		c.wg.Add(1)
	}
	c.mu.Unlock()
	if err != nil {
		return err
	}
	c.log.Debugf("subscribed on nsqd %s", addr)
	go c.read(cc)
	return nil
}

// consumerConn is one subscribed connection to an nsqd.
type consumerConn struct {
	addr string
	*nsqSession

	wmu   sync.Mutex // guards the session's w, and fins and armed
	fins  int        // FINs in w, not flushed yet
	armed bool       // the flush timer is set
	timer *time.Timer
	finAt int // flush once this many FINs wait
}

// identifyResponse is the part of nsqd's answer to IDENTIFY used here.
type identifyResponse struct {
	MaxRdyCount int64 `json:"max_rdy_count"`
}

// dial connects to addr and goes through the handshake: IDENTIFY (no output
// buffering: a message is written to the socket as nsqd takes it), SUB, and
// RDY.
func (c *nsqConsumer) dial(addr string) (*consumerConn, error) {
	s, err := dialNSQ(addr, c.heartbeat, map[string]any{
		"output_buffer_size":    -1,
		"output_buffer_timeout": -1,
	})
	if err != nil {
		return nil, err
	}
	cc := &consumerConn{addr: addr, nsqSession: s}
	if err := c.subscribe(cc); err != nil {
		s.nc.Close()
		return nil, err
	}
	return cc, nil
}

// subscribe sends SUB and RDY, still within the dial's deadline.
func (c *nsqConsumer) subscribe(cc *consumerConn) error {
	rdy := int64(c.maxInFlight)
	if len(cc.identified) > 0 && cc.identified[0] == '{' {
		var resp identifyResponse
		if err := json.Unmarshal(cc.identified, &resp); err != nil {
			return fmt.Errorf("IDENTIFY: nsqd's answer: %w", err)
		}
		if resp.MaxRdyCount > 0 && resp.MaxRdyCount < rdy {
			rdy = resp.MaxRdyCount
		}
	}
	if _, err := cc.command(nsq.Subscribe(c.topic, c.channel)); err != nil {
		return err
	}
	// RDY has no response.
	if _, err := nsq.Ready(int(rdy)).WriteTo(cc.w); err != nil {
		return err
	}
	if err := cc.w.Flush(); err != nil {
		return err
	}
	cc.finAt = max(1, int(rdy)/2)
	cc.timer = time.AfterFunc(time.Hour, cc.flushFINs)
	cc.timer.Stop()
	return cc.nc.SetDeadline(time.Time{})
}

// read handles cc's frames until the connection fails or the consumer
// stops: messages go to the handler and are acknowledged, heartbeats are
// answered.
func (c *nsqConsumer) read(cc *consumerConn) {
	defer c.wg.Done()
	err := c.readFrames(cc)
	cc.timer.Stop()
	cc.flushFINs() // what was handled is acknowledged, if the connection still takes it
	cc.nc.Close()

	c.mu.Lock()
	stopped := c.stopped
	if c.conns[cc.addr] == cc {
		delete(c.conns, cc.addr)
	}
	c.mu.Unlock()
	if !stopped {
		c.closes.Add(1)
		// The queue's watcher warns of the loss and of the resync.
		c.log.WithError(err).Debugf("lost the connection to nsqd %s; redialling every %s", cc.addr, c.reconnect)
	}
}

func (c *nsqConsumer) readFrames(cc *consumerConn) error {
	return cc.readLoop(cc.nop, func(frameType int32, data []byte) error {
		switch frameType {
		case nsq.FrameTypeMessage:
			// timestamp (8 bytes), attempts (2), id (16), body
			if len(data) < 26 {
				return fmt.Errorf("nsqd sent a message frame of %d bytes", len(data))
			}
			c.handle(data[26:])
			return cc.fin(data[10:26])
		case nsq.FrameTypeResponse:
			return nil // an answer to nothing we wait for
		case nsq.FrameTypeError:
			// nsqd closes the connection after a fatal error; the others
			// (a FIN for a message that timed out, say) are only reported.
			c.log.Warnf("nsqd %s: %s", cc.addr, data)
			return nil
		default:
			return fmt.Errorf("nsqd sent a frame of unknown type %d", frameType)
		}
	})
}

// fin acknowledges the message id, in a batch (see nsqConsumer).
func (cc *consumerConn) fin(id []byte) error {
	cc.wmu.Lock()
	defer cc.wmu.Unlock()
	cc.w.WriteString("FIN ")
	cc.w.Write(id)
	cc.w.WriteByte('\n')
	cc.fins++
	if cc.fins >= cc.finAt {
		return cc.flushLocked()
	}
	if !cc.armed {
		cc.armed = true
		cc.timer.Reset(finDelay)
	}
	return nil
}

// nop answers a heartbeat, with the FINs waiting.
func (cc *consumerConn) nop() error {
	cc.wmu.Lock()
	defer cc.wmu.Unlock()
	cc.w.WriteString("NOP\n")
	return cc.flushLocked()
}

// flushFINs writes the FINs waiting; the timer calls it. A failed write
// fails the next read, which ends the connection.
func (cc *consumerConn) flushFINs() {
	cc.wmu.Lock()
	defer cc.wmu.Unlock()
	cc.flushLocked()
}

func (cc *consumerConn) flushLocked() error {
	cc.armed = false
	cc.fins = 0
	if cc.w.Buffered() == 0 {
		return nil
	}
	if err := cc.nc.SetWriteDeadline(time.Now().Add(nsqWriteTimeout)); err != nil {
		return err
	}
	err := cc.w.Flush()
	if err != nil {
		cc.nc.Close() // a write that failed half way leaves the stream unusable
	}
	return err
}

// stop closes every connection and waits for the reading and redialling
// goroutines. Messages not acknowledged yet are requeued by nsqd on a
// channel that goes with its last client (it is ephemeral).
func (c *nsqConsumer) stop() {
	c.mu.Lock()
	if c.stopped {
		c.mu.Unlock()
		<-c.done
		return
	}
	c.stopped = true
	conns := make([]*consumerConn, 0, len(c.conns))
	for _, cc := range c.conns {
		conns = append(conns, cc)
	}
	c.mu.Unlock()
	close(c.stopping)
	for _, cc := range conns {
		cc.nc.Close()
	}
	c.wg.Wait()
	close(c.done)
}
