package esweb

import (
	"context"
	"sync"
)

// hookContext is the context a connection's hooks get (Authorize, Filter,
// pass-through): the connection's values, and done when the connection
// ends. It lives inside the conn instead of being a context.WithCancel,
// which would cost every idle connection a cancelCtx and a closure.
type hookContext struct {
	context.Context // holds the shared.Connection; never done

	mu    sync.Mutex
	done  chan struct{} // made on the first Done
	ended bool
}

// Done is closed when the connection has ended.
func (h *hookContext) Done() <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.done == nil {
		h.done = make(chan struct{})
		if h.ended {
			close(h.done)
		}
	}
	return h.done
}

// Err is context.Canceled once the connection has ended.
func (h *hookContext) Err() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ended {
		return context.Canceled
	}
	return nil
}

// end marks the connection ended; it may be called more than once.
func (h *hookContext) end() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ended {
		return
	}
	h.ended = true
	if h.done != nil {
		close(h.done)
	}
}
