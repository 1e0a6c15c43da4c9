package esclient

import (
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
	busy  atomic.Bool // a callback is running
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
			d.busy.Store(true)
			f()
			d.busy.Store(false)
		}
	}
}

// close drops the events not yet run and waits for the goroutine to end,
// unless a callback is running: it may be the caller, which cannot wait for
// itself. The goroutine then ends as soon as the callback returns.
func (d *dispatcher) close() {
	d.once.Do(func() { close(d.quit) })
	if !d.busy.Load() {
		<-d.done
	}
}
