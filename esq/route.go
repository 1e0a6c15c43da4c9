package esq

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"

	"github.com/entity-sync/entity-sync/shared"
)

// RouteToken is what a queue that routes by key (see Interest) appends to
// the entity type's topic name to make the key's own: 16 hex digits of the
// SHA-256 of the id, the same in every process. It has a fixed length and
// a fixed alphabet whatever the id holds (dots, wildcards, 256 bytes), and
// two ids that share a token only cost the servers watching one of them a
// notification they drop.
func RouteToken(id string) string {
	sum := sha256.Sum256([]byte(id))
	return hex.EncodeToString(sum[:8])
}

// KeyBody returns key's notification as one message body, the seed's
// form {"entity":"items","id":"100"}, byte for byte as json.Marshal writes
// it (by hand when nothing needs escaping, the common case).
func KeyBody(key shared.EntityKey) []byte {
	if !plainJSON(string(key.Entity)) || !plainJSON(key.ID) {
		b, _ := json.Marshal(key) // a struct of strings always encodes
		return b
	}
	b := make([]byte, 0, len(`{"entity":"","id":""}`)+len(key.Entity)+len(key.ID))
	b = append(b, `{"entity":"`...)
	b = append(b, key.Entity...)
	b = append(b, `","id":"`...)
	b = append(b, key.ID...)
	return append(b, `"}`...)
}

// plainJSON reports whether json.Marshal writes s between quotes as it is:
// printable ASCII other than the quote, the backslash and the characters
// it escapes for HTML.
func plainJSON(s string) bool {
	for i := range len(s) {
		switch c := s[i]; {
		case c < 0x20 || c >= 0x7f, c == '"', c == '\\', c == '<', c == '>', c == '&':
			return false
		}
	}
	return true
}

// MaxRoutedKeys is the most keys a notification may name and still be
// routed per key. One that names more (a large NotifyKeys batch) goes as it
// is, once, on the entity type's own topic, which every server hears: one
// message to every server then costs the broker less than a message per
// key, and a server drops the keys nobody watches there.
const MaxRoutedKeys = 16

// Routed is one message of a routed publish: the body to send on the key's
// topic, the entity type's topic plus Token.
type Routed struct {
	Token string
	Body  []byte
}

// RouteByKey says where a routing queue publishes body on entity's topic:
// the messages to send per key, or nil when body goes as it is on the
// entity type's own topic (it names no key, or more than MaxRoutedKeys, or
// is not a notification at all). A body naming one key is sent unchanged;
// one naming several becomes one {"entity","id"} body per distinct key.
func RouteByKey(entity shared.EntityType, body []byte) []Routed {
	var n shared.Notification
	if err := json.Unmarshal(body, &n); err != nil {
		return nil
	}
	if n.Entity != "" && n.Entity != entity {
		return nil // the subscribers' decode refuses it; no need to route
	}
	ids := n.IDs
	if n.ID != "" {
		ids = append([]string{n.ID}, ids...)
	}
	seen := make(map[string]bool, len(ids))
	var distinct []string
	for _, id := range ids {
		if id != "" && !seen[id] {
			seen[id] = true
			distinct = append(distinct, id)
		}
	}
	if len(distinct) == 0 || len(distinct) > MaxRoutedKeys {
		return nil
	}
	if len(distinct) == 1 && len(ids) == 1 {
		return []Routed{{Token: RouteToken(distinct[0]), Body: body}}
	}
	out := make([]Routed, len(distinct))
	for i, id := range distinct {
		b, err := json.Marshal(shared.Notification{Entity: entity, ID: id})
		if err != nil {
			return nil
		}
		out[i] = Routed{Token: RouteToken(id), Body: b}
	}
	return out
}
