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

// LiveReporter is implemented by queues that can tell, at any moment,
// whether their subscriptions are connected to the broker: the readiness
// check of package entitysync asks it, so a load balancer can send new
// clients to servers that hear every change. Every queue in this module
// implements it.
type LiveReporter interface {
	// Live returns nil while every subscription receives the messages
	// published on its entity type (none subscribed counts as live), or
	// an error saying which does not and why: the broker connection is
	// lost and being re-established, or the queue is closed (ErrClosed).
	Live() error
}

// CheckLive returns q's Live error, or nil when q does not implement
// LiveReporter (a queue that cannot tell is taken to be live).
func CheckLive(q Queue) error {
	if r, ok := q.(LiveReporter); ok {
		return r.Live()
	}
	return nil
}

// KeyQueue is implemented by a queue that carries a key's notification
// from the key itself, without the bridge encoding it and the queue
// decoding it again: the in-process queue hands the key over as it is, and
// a queue that routes by key needs the id to pick the key's topic. The
// bridge uses it for its notifications of one key, and asks the queue for
// its messages with SubscribeKeys, when Keys returns the queue.
type KeyQueue interface {
	Queue
	// PublishKey publishes key's notification: what Publish sends for the
	// body KeyBody(key) on key.Entity, which is also what subscribers of
	// other processes receive.
	PublishKey(ctx context.Context, key shared.EntityKey) error
	// SubscribeKeys is Subscribe, with onKey, if the queue hands some keys
	// over as they are (as the in-process queue does those published with
	// PublishKey), taking those; every other message goes to onMessage.
	SubscribeKeys(entity shared.EntityType, onMessage func(body []byte), onKey func(shared.EntityKey), onLoss func()) error
	// KeyQueue returns the receiver itself (a pointer). A type that embeds
	// a KeyQueue gets its PublishKey and SubscribeKeys too, which bypass
	// its own Publish and Subscribe; its KeyQueue returns the embedded
	// queue, which tells Keys not to use them.
	KeyQueue() Queue
}

// Keys returns q as a KeyQueue when it is one itself (see
// KeyQueue.KeyQueue), or nil.
func Keys(q Queue) KeyQueue {
	if k, ok := q.(KeyQueue); ok && k.KeyQueue() == q {
		return k
	}
	return nil
}

// Interest is implemented by a queue that can route: deliver a key's
// notifications only to the servers that watch the key, instead of every
// message of an entity type to every server (NATS subjects and Redis
// channels per key do this; NSQ and Postgres cannot). The bridge watches a
// key when it gets its first local subscriber, before the key's first fetch,
// and unwatches it when the last one leaves.
//
// While a queue routes, a subscription receives the messages of the keys
// watched on its entity type, and every message that names no key (or that
// a producer published on the entity type's own topic), as before.
type Interest interface {
	// Routes reports whether the queue routes by key: one that can but is
	// configured to broadcast returns false, and is then treated as a
	// broadcast queue (Watch and Unwatch are not called).
	Routes() bool
	// Watch adds the key to what this queue receives and returns once the
	// broker has the interest: a message for the key published after Watch
	// returns is delivered. Watches are counted: the key is received until
	// Unwatch was called as often as Watch. An error other than ErrClosed
	// means the interest could not be confirmed now (the broker connection
	// is down); it stays registered, and the entity type's onLoss is called
	// once it is live, as after any reconnect.
	Watch(key shared.EntityKey) error
	// Unwatch undoes one Watch. It does not wait for the broker: a message
	// already on its way may still arrive.
	Unwatch(key shared.EntityKey)
}

// Routing returns q as an Interest when q routes by key, or nil when it
// broadcasts.
func Routing(q Queue) Interest {
	if i, ok := q.(Interest); ok && i.Routes() {
		return i
	}
	return nil
}
