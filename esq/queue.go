// Package esq is the queue boundary: how a change notification (an entity key)
// leaves one server and reaches every server. The bridge depends only on the
// Queue interface; this package provides an NSQ implementation for clusters, an
// in-process one for a single server, and adapters for the seed's closure
// builders.
package esq

import (
	"context"
	"errors"

	"github.com/entity-sync/entity-sync/shared"
)

// Queue carries notifications between servers. Every server that subscribes to
// an entity type receives every message published on it (broadcast, not load
// balancing).
type Queue interface {
	// Publish sends body on the entity type's topic. It returns an error when
	// the message could not be handed to the broker.
	Publish(ctx context.Context, entity shared.EntityType, body []byte) error
	// Subscribe starts delivering the entity type's messages to onMessage and
	// returns only once that delivery is live: a message published after
	// Subscribe returns reaches onMessage. onLoss, if not nil, is called when
	// messages may have been lost (the broker connection dropped and came
	// back), after delivery is live again. Both callbacks must not block.
	Subscribe(entity shared.EntityType, onMessage func(body []byte), onLoss func()) error
	// Close stops delivery and releases connections. It waits for in-flight
	// callbacks to return or ctx to end.
	Close(ctx context.Context) error
}

// ErrClosed is returned by a queue that has been closed.
var ErrClosed = errors.New("esq: queue closed")

// ErrAlreadySubscribed is returned when an entity type is subscribed twice on
// the same queue.
var ErrAlreadySubscribed = errors.New("esq: entity type already subscribed")

// SizeLimited is implemented by a queue whose messages have a size limit,
// such as Postgres NOTIFY's: the bridge splits a notification of many keys
// into messages that fit.
type SizeLimited interface {
	// MaxMessageBytes is the largest message body Publish accepts.
	MaxMessageBytes() int
}

// MaxMessageBytes returns the largest message body q accepts, or 0 when q
// sets no limit.
func MaxMessageBytes(q Queue) int {
	if l, ok := q.(SizeLimited); ok {
		return l.MaxMessageBytes()
	}
	return 0
}
