package esq

import (
	"context"
	"sync"

	"github.com/entity-sync/entity-sync/shared"
)

// Memory is an in-process Queue: a single server, nothing to install. Publish
// calls the subscriber's callback synchronously, so a notification is never
// lost while the process lives. It is a KeyQueue: with PublishKey and
// SubscribeKeys, a key goes from publisher to subscriber as it is, never
// encoded.
type Memory struct {
	mu     sync.RWMutex
	subs   map[shared.EntityType]memorySub
	closed bool
}

type memorySub struct {
	onMessage func([]byte)
	onKey     func(shared.EntityKey) // nil: keys are encoded for onMessage
}

// NewMemory returns an empty in-process queue.
func NewMemory() *Memory {
	return &Memory{subs: make(map[shared.EntityType]memorySub)}
}

// Publish delivers body to the entity type's subscriber, if any.
func (m *Memory) Publish(_ context.Context, entity shared.EntityType, body []byte) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return ErrClosed
	}
	if s := m.subs[entity]; s.onMessage != nil {
		s.onMessage(body)
	}
	return nil
}

var _ KeyQueue = (*Memory)(nil)

// KeyQueue returns m (see KeyQueue).
func (m *Memory) KeyQueue() Queue { return m }

// PublishKey delivers key's notification to its entity type's subscriber,
// if any: the key itself to one that subscribed with an onKey, the seed's
// JSON body (KeyBody) to any other. A change published by the bridge on a
// *Memory itself (see Keys) then costs no JSON encoding or decoding.
func (m *Memory) PublishKey(_ context.Context, key shared.EntityKey) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return ErrClosed
	}
	switch s := m.subs[key.Entity]; {
	case s.onKey != nil:
		s.onKey(key)
	case s.onMessage != nil:
		s.onMessage(KeyBody(key))
	}
	return nil
}

// Subscribe registers onMessage for the entity type. onLoss is never called:
// an in-process queue loses nothing.
func (m *Memory) Subscribe(entity shared.EntityType, onMessage func([]byte), onLoss func()) error {
	return m.SubscribeKeys(entity, onMessage, nil, onLoss)
}

// SubscribeKeys is Subscribe, with onKey (which may be nil) taking the keys
// published with PublishKey. onLoss is never called.
func (m *Memory) SubscribeKeys(entity shared.EntityType, onMessage func([]byte), onKey func(shared.EntityKey), _ func()) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	if _, ok := m.subs[entity]; ok {
		return ErrAlreadySubscribed
	}
	m.subs[entity] = memorySub{onMessage: onMessage, onKey: onKey}
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
