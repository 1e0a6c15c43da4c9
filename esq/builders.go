package esq

import (
	"context"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/shared"
)

// The seed's closure builders. Their function types carry no error, so
// failures are logged. The NSQ queue behind them is shared per address and
// lives until the process exits; use NewNSQ for a queue that can be closed.

var (
	builtMu sync.Mutex
	built   = map[string]*NSQ{}
)

func builtQueue(addr string) (*NSQ, error) {
	builtMu.Lock()
	defer builtMu.Unlock()
	if q, ok := built[addr]; ok {
		return q, nil
	}
	q, err := NewNSQ(NSQConfig{NSQDAddrs: []string{addr}})
	if err != nil {
		return nil, err
	}
	built[addr] = q
	return q, nil
}

// BuildPublisher returns the seed's publisher builder for the nsqd at addr
// (TCP address). A failed publish is logged.
func BuildPublisher(addr string) shared.EntityHandler {
	return func(entityType shared.EntityType) shared.ByteHandler {
		return func(b []byte) {
			q, err := builtQueue(addr)
			if err == nil {
				err = q.Publish(context.Background(), entityType, b)
			}
			if err != nil {
				logrus.WithError(err).WithField("entity", entityType).Error("esq: publish failed")
			}
		}
	}
}

// BuildSubscriber returns the seed's subscriber builder for the nsqd at addr
// (TCP address). Each call subscribes on this process's ephemeral channel and
// returns once the subscription is live; a failure is logged.
func BuildSubscriber(addr string) shared.EntityByteHandler {
	return func(entityType shared.EntityType, callback shared.ByteHandler) {
		q, err := builtQueue(addr)
		if err == nil {
			err = q.Subscribe(entityType, callback, nil)
		}
		if err != nil {
			logrus.WithError(err).WithField("entity", entityType).Error("esq: subscribe failed")
		}
	}
}

// FromBuilders adapts the seed's publisher and subscriber builders to a Queue.
// The builders cannot report errors or broker loss, so Publish always
// succeeds, onLoss is never called and Close releases nothing.
func FromBuilders(publisher shared.EntityHandler, subscriber shared.EntityByteHandler) Queue {
	return &builderQueue{publisher: publisher, subscriber: subscriber, publishers: map[shared.EntityType]shared.ByteHandler{}}
}

type builderQueue struct {
	publisher  shared.EntityHandler
	subscriber shared.EntityByteHandler

	mu         sync.Mutex
	publishers map[shared.EntityType]shared.ByteHandler
}

func (b *builderQueue) Publish(_ context.Context, entity shared.EntityType, body []byte) error {
	b.mu.Lock()
	pub, ok := b.publishers[entity]
	if !ok {
		pub = b.publisher(entity)
		b.publishers[entity] = pub
	}
	b.mu.Unlock()
	pub(body)
	return nil
}

func (b *builderQueue) Subscribe(entity shared.EntityType, onMessage func([]byte), _ func()) error {
	b.subscriber(entity, onMessage)
	return nil
}

func (b *builderQueue) Close(context.Context) error { return nil }
