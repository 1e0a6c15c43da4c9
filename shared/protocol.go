package shared

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
