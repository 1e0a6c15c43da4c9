package pgq

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"unicode/utf8"

	"github.com/entity-sync/entity-sync/shared"
)

// MaxPayload is the longest notification payload Postgres accepts, in bytes:
// NOTIFY refuses one of 8000 bytes or more ("payload string too long") with
// the default block size.
const MaxPayload = 7999

// ErrPayloadTooLarge is returned, before anything is sent, for a notification
// whose payload would exceed MaxPayload.
var ErrPayloadTooLarge = errors.New("pgq: notification payload too large for Postgres")

// The payload on the channel is the body itself when the body is a JSON
// object naming its entity type in its "entity" field, which is what
// entity-sync publishes ({"entity":"items","id":"100"}, with DetectLoss's
// "_es" stamp) and what SQL sends. Any other body (DetectLoss's marks, which
// carry no key, or a body that is not such a JSON object) travels in an
// envelope that names the entity type and carries the body in base64:
//
//	{"entity":"items","_pgq":"eyJfZXMiOnsicCI6IjlmMmMiLCJuIjo0Mn19"}
//
// Receivers unwrap the envelope, so subscribers get exactly the body that
// was published.
const envelopeField = "_pgq"

// wire is what a receiver reads from a payload. Pointers tell an absent
// field from an empty one.
type wire struct {
	Entity *string `json:"entity"`
	Body   *[]byte `json:"_pgq"` // encoding/json reads base64 into []byte
}

// decode returns the entity type a payload is for and the body to hand to
// its subscriber, or ok false when the payload names no entity type.
// enveloped tells whether the body came out of an envelope.
func decode(payload []byte) (entity shared.EntityType, body []byte, enveloped, ok bool) {
	var w wire
	if len(payload) == 0 || json.Unmarshal(payload, &w) != nil || w.Entity == nil || *w.Entity == "" {
		return "", nil, false, false
	}
	if w.Body != nil {
		return shared.EntityType(*w.Entity), *w.Body, true, true
	}
	return shared.EntityType(*w.Entity), payload, false, true
}

// encode returns the payload that carries body for entity (see
// envelopeField), or ErrPayloadTooLarge.
func encode(entity shared.EntityType, body []byte) (string, error) {
	if err := checkEntity(entity); err != nil {
		return "", err
	}
	payload := body
	// Sent as it is only if a receiver reads back this entity type and this
	// body, and Postgres takes it as text (no NUL byte, valid UTF-8).
	e, _, enveloped, ok := decode(body)
	if !ok || e != entity || enveloped || !utf8.Valid(body) || bytes.IndexByte(body, 0) >= 0 {
		var err error
		if payload, err = json.Marshal(struct {
			Entity string `json:"entity"`
			Body   []byte `json:"_pgq"`
		}{string(entity), body}); err != nil {
			return "", err
		}
	}
	if len(payload) > MaxPayload {
		return "", fmt.Errorf("%w: %d bytes for entity type %q, Postgres takes at most %d", ErrPayloadTooLarge, len(payload), entity, MaxPayload)
	}
	return string(payload), nil
}

// checkEntity refuses an entity type no payload can name: empty, or not
// valid UTF-8 (a JSON string would not carry it unchanged).
func checkEntity(entity shared.EntityType) error {
	if entity == "" || !utf8.ValidString(string(entity)) {
		return fmt.Errorf("pgq: entity type %q must be non-empty valid UTF-8", entity)
	}
	return nil
}
