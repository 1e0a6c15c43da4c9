package esq

import (
	"context"
	"sync"

	"github.com/entity-sync/entity-sync/shared"
)

// Memory is an in-process Queue: a single server, nothing to install. Publish
// calls the subscriber's callback synchronously, so a notification is never
// lost while the process lives.
type Memory struct {
	mu     sync.RWMutex
	subs   map[shared.EntityType]func([]byte)
	closed bool
}

// NewMemory returns an empty in-process queue.
func NewMemory() *Memory {
	return &Memory{subs: make(map[shared.EntityType]func([]byte))}
}

// Publish delivers body to the entity type's subscriber, if any.
func (m *Memory) Publish(_ context.Context, entity shared.EntityType, body []byte) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return ErrClosed
	}
	if f := m.subs[entity]; f != nil {
		f(body)
	}
	return nil
}

// Subscribe registers onMessage for the entity type. onLoss is never called:
// an in-process queue loses nothing.
func (m *Memory) Subscribe(entity shared.EntityType, onMessage func([]byte), _ func()) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	if _, ok := m.subs[entity]; ok {
		return ErrAlreadySubscribed
	}
	m.subs[entity] = onMessage
	return nil
}

// Close stops delivery. Publish holds a read lock across the callback, so once
// Close returns no callback is running.
func (m *Memory) Close(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	m.subs = nil
	return nil
}

// Live returns ErrClosed once the queue is closed: an in-process queue is
// otherwise always live.
func (m *Memory) Live() error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return ErrClosed
	}
	return nil
}
