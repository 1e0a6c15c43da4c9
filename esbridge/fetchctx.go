package esbridge

import (
	"context"
	"sync"
	"time"
)

// fetchContext is the context of one fetch: the bridge's, with the fetch's
// deadline. A context.WithTimeout per fetch costs a timer and several
// allocations per change, and many fetchers never look at their context
// (the seed's lookups cannot): this one makes the real context, timer
// included, only when the fetcher first asks for Done or a Value.
type fetchContext struct {
	parent   context.Context
	deadline time.Time

	mu       sync.Mutex
	ctx      context.Context // made on first use
	cancel   context.CancelFunc
	released bool // the fetch returned: a context made now is already cancelled
}

func newFetchContext(parent context.Context, timeout time.Duration) *fetchContext {
	return &fetchContext{parent: parent, deadline: time.Now().Add(timeout)}
}

// real returns the context the fetchContext stands for, made on first use.
func (c *fetchContext) real() context.Context {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ctx == nil {
		c.ctx, c.cancel = context.WithDeadline(c.parent, c.deadline)
		if c.released {
			c.cancel()
		}
	}
	return c.ctx
}

// release ends the context once the fetch has returned, as the cancel of a
// context.WithTimeout would.
func (c *fetchContext) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.released = true
	if c.cancel != nil {
		c.cancel()
	}
}

// Deadline returns the fetch's deadline, or the bridge's if that is sooner.
func (c *fetchContext) Deadline() (time.Time, bool) {
	if d, ok := c.parent.Deadline(); ok && d.Before(c.deadline) {
		return d, true
	}
	return c.deadline, true
}

// Done returns the real context's channel.
func (c *fetchContext) Done() <-chan struct{} { return c.real().Done() }

// Err is the real context's error; before that is made, the one it would
// have.
func (c *fetchContext) Err() error {
	c.mu.Lock()
	ctx, released := c.ctx, c.released
	c.mu.Unlock()
	if ctx != nil {
		return ctx.Err()
	}
	if err := c.parent.Err(); err != nil {
		return err
	}
	if released {
		return context.Canceled
	}
	if !time.Now().Before(c.deadline) {
		return context.DeadlineExceeded
	}
	return nil
}

// Value asks the real context, so that context.Cause and derived contexts
// see its cancellation.
func (c *fetchContext) Value(key any) any { return c.real().Value(key) }
