package esclient

import (
	"bytes"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
)

// dispatcher runs callbacks one at a time, in the order they were pushed, on
// its own goroutine, so that the client never calls application code with
// its lock held and callbacks may call back into the client.
type dispatcher struct {
	mu    sync.Mutex
	queue []func()
	wake  chan struct{}
	quit  chan struct{}
	done  chan struct{}
	gid   atomic.Uint64 // the id of the goroutine running loop
	once  sync.Once
}

func newDispatcher() dispatcher {
	return dispatcher{wake: make(chan struct{}, 1), quit: make(chan struct{}), done: make(chan struct{})}
}

func (d *dispatcher) push(f func()) {
	d.mu.Lock()
	d.queue = append(d.queue, f)
	d.mu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

func (d *dispatcher) loop() {
	d.gid.Store(goroutineID())
	defer close(d.done)
	for {
		select {
		case <-d.quit:
			return
		case <-d.wake:
		}
		d.mu.Lock()
		q := d.queue
		d.queue = nil
		d.mu.Unlock()
		for i, f := range q {
			select {
			case <-d.quit:
				return
			default:
			}
			q[i] = nil
			f()
		}
	}
}

// close drops the events not yet run and waits until no callback runs and
// none will start. Called from a callback (on the dispatcher's own
// goroutine), it cannot wait for that callback, which is its caller: it
// returns at once, and the goroutine ends as soon as the callback returns.
func (d *dispatcher) close() {
	d.once.Do(func() { close(d.quit) })
	if d.gid.Load() == goroutineID() {
		return
	}
	<-d.done
}

// goroutineID returns the current goroutine's id, parsed from the first line
// of its stack trace ("goroutine 123 [running]:"), as
// golang.org/x/net/http2 does for its debug checks. The dispatcher needs it
// only to tell "Close from a callback" (which must not wait for itself)
// from "Close from anywhere else" (which must wait for the running
// callback); Close is rare, so the cost does not matter.
func goroutineID() uint64 {
	var buf [64]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	if i := bytes.IndexByte(b, ' '); i >= 0 {
		b = b[:i]
	}
	id, err := strconv.ParseUint(string(b), 10, 64)
	if err != nil {
		panic("esclient: cannot parse goroutine id from " + strconv.Quote(string(buf[:])))
	}
	return id
}
