// Package shared holds the vocabulary every other entity-sync package speaks:
// entity types and keys, the websocket request message and its actions, and the
// function types the seed API is written in.
package shared

import (
	"encoding/json"
	"errors"
	"fmt"
	"unicode"
	"unicode/utf8"
)

// EntityType names a kind of entity ("items", "users"). It doubles as the queue
// topic a change notification for that kind travels on.
type EntityType string

// GetQueueName returns the queue topic for the entity type (without any prefix a
// queue implementation may add).
func (e EntityType) GetQueueName() string { return string(e) }

// EntityKey identifies one entity: its type and its id. It is what clients
// subscribe to and what travels through the queue, encoded as JSON:
// {"entity":"items","id":"100"}.
type EntityKey struct {
	Entity EntityType `json:"entity"`
	ID     string     `json:"id"`
}

// String renders the key as "entity/id", for logs.
func (k EntityKey) String() string { return string(k.Entity) + "/" + k.ID }

// Hash returns a string that identifies the key uniquely. It is kept from the
// seed API; EntityKey is comparable and can be used as a map key directly.
func (k EntityKey) Hash() string { return fmt.Sprintf("%d:%s/%s", len(k.Entity), k.Entity, k.ID) }

// Notification is a change notification as it travels through the queue,
// as JSON: one key, {"entity":"items","id":"100"} (the seed's form, which
// every producer may keep sending), or several keys of one entity type,
// {"entity":"lists","ids":["1","2"]}. A message may carry both fields; it
// then stands for every key they name. Receivers ignore fields they do not
// know (a queue wrapper may add its own).
type Notification struct {
	Entity EntityType `json:"entity"`
	ID     string     `json:"id,omitempty"`
	IDs    []string   `json:"ids,omitempty"`
}

// Limits on the parts of a key. Clients choose keys, so both are bounded to
// keep one request's cost bounded.
const (
	MaxEntityLength = 64  // bytes; also NSQ's topic name limit
	MaxIDLength     = 256 // bytes
)

// ErrEmptyKey is returned for a key whose entity type or id is empty.
var ErrEmptyKey = errors.New("entity key needs a non-empty entity and id")

// ErrInvalidKey is returned for a key that is too long or holds characters
// that are not printable UTF-8.
var ErrInvalidKey = errors.New("invalid entity key")

// Validate reports whether the key is usable: both parts non-empty, at most
// MaxEntityLength and MaxIDLength bytes, valid UTF-8 without control
// characters.
func (k EntityKey) Validate() error {
	if k.Entity == "" || k.ID == "" {
		return ErrEmptyKey
	}
	if len(k.Entity) > MaxEntityLength || len(k.ID) > MaxIDLength {
		return fmt.Errorf("%w: entity type at most %d bytes, id at most %d", ErrInvalidKey, MaxEntityLength, MaxIDLength)
	}
	if !printable(string(k.Entity)) || !printable(k.ID) {
		return fmt.Errorf("%w: only printable UTF-8 is allowed", ErrInvalidKey)
	}
	return nil
}

func printable(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return false
		}
	}
	return true
}

// Action names what a client asks for in a Message.
type Action string

// The actions of the wire protocol. A frame whose action is empty goes to the
// application's pass-through function.
const (
	ActionSubscribe   Action = "subscribe"
	ActionUnsubscribe Action = "unsubscribe"
	ActionSecret      Action = "secret"
)

// Message is a client -> server websocket frame:
// {"action":"subscribe","body":{"entity":"items","id":"100"}}.
type Message struct {
	Action Action          `json:"action"`
	Body   json.RawMessage `json:"body"`
}

// ByteHandler receives one block of bytes: a row to send, a message to publish.
type ByteHandler func(b []byte)

// EntityHandler builds a publisher for an entity type: the returned ByteHandler
// publishes its argument on that type's topic (seed API).
type EntityHandler func(entityType EntityType) ByteHandler

// EntityByteHandler subscribes callback to the topic of an entity type (seed API).
type EntityByteHandler func(entityType EntityType, callback ByteHandler)

// AddressableEntityHandler builds an EntityHandler for a queue address (seed API).
type AddressableEntityHandler func(addr string) EntityHandler

// AddressableEntityByteHandler builds an EntityByteHandler for a queue address (seed API).
type AddressableEntityByteHandler func(addr string) EntityByteHandler

// SecretDBHandler is the seed's lookup function: it fetches the entity for key
// as the holder of secret may see it and calls handler once per row to send.
type SecretDBHandler func(key EntityKey, secret string, handler ByteHandler)

// PassThrough receives every websocket frame that carries no action, with the
// secret the connection has set (empty if none).
type PassThrough func(secret string, b []byte)

// ErrForbidden is the one "not allowed" error: wrapped by the bridge when the
// Authorize hook refuses a key, and by an Authenticate hook to answer an
// upgrade request with 403 instead of 401.
var ErrForbidden = errors.New("entitysync: forbidden")
