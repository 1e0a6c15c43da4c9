package shared

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
)

// The parts of the wire protocol (docs/protocol.md) that servers and clients
// both need.

// WebsocketPath is where entity-sync servers serve their websocket endpoint
// by default.
const WebsocketPath = "/ws/entity-sync/"

// Subprotocol is the websocket subprotocol of the envelope protocol. A
// client that does not offer it speaks the seed's raw protocol.
const Subprotocol = "entitysync.v1"

// ErrorCode is the typed reason in an envelope "error" frame.
type ErrorCode string

// The error codes of the envelope protocol; docs/protocol.md says when each
// is sent.
const (
	CodeBadRequest           ErrorCode = "bad_request"
	CodeUnknownAction        ErrorCode = "unknown_action"
	CodeInvalidKey           ErrorCode = "invalid_key"
	CodeUnknownEntity        ErrorCode = "unknown_entity"
	CodeForbidden            ErrorCode = "forbidden"
	CodeTooManySubscriptions ErrorCode = "too_many_subscriptions"
	CodeRateLimited          ErrorCode = "rate_limited"
	CodeInternal             ErrorCode = "internal"
)

// VersionLength is the length of a state's version: 16 lowercase hex
// characters.
const VersionLength = 16

// Version returns the version of a state made of rows, as every envelope
// state frame carries it: the first 8 bytes, in lowercase hex, of SHA-256
// over the rows in order, each preceded by its length as an 8-byte
// big-endian number. No rows (the entity is gone) hash the empty input.
// The same rows in the same order have the same version on every server.
func Version(rows [][]byte) string {
	h := sha256.New()
	var n [8]byte
	for _, r := range rows {
		binary.BigEndian.PutUint64(n[:], uint64(len(r)))
		h.Write(n[:])
		h.Write(r)
	}
	var sum [sha256.Size]byte
	return hex.EncodeToString(h.Sum(sum[:0])[:8])
}

// ValidVersion reports whether v has the form of a version (16 lowercase
// hex characters). A subscribe carrying anything else is treated as
// carrying no version.
func ValidVersion(v string) bool {
	if len(v) != VersionLength {
		return false
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
