package esweb

import (
	"encoding/json"
	"fmt"

	"github.com/entity-sync/entity-sync/shared"
)

// requestError is a refused client request: logged in raw mode, sent as an
// error frame in envelope mode.
type requestError struct {
	code shared.ErrorCode
	msg  string
}

func (e *requestError) Error() string { return string(e.code) + ": " + e.msg }

func refuse(code shared.ErrorCode, format string, args ...any) *requestError {
	return &requestError{code: code, msg: fmt.Sprintf(format, args...)}
}

// request is a client frame: the seed's Message plus an optional reference
// the server echoes in the ack or error.
type request struct {
	Action shared.Action   `json:"action"`
	Body   json.RawMessage `json:"body"`
	Ref    string          `json:"ref,omitempty"`
}

// parsedRequest is a decoded and validated client frame.
type parsedRequest struct {
	action  shared.Action
	ref     string           // echoed in the ack or error; set even when parsing fails later
	key     shared.EntityKey // subscribe, unsubscribe
	version string           // subscribe: the version the client holds, "" if none or malformed
	secret  string           // secret
}

// keyBody is a subscribe or unsubscribe body. A version that is not a
// well-formed one (shared.ValidVersion), of any JSON type, is not an error:
// the client is treated as holding nothing.
type keyBody struct {
	Entity  shared.EntityType `json:"entity"`
	ID      string            `json:"id"`
	Version json.RawMessage   `json:"version"`
}

// errorKey returns the key an error about this request is about, if the
// request named a valid one (an invalid key is not echoed back).
func (p parsedRequest) errorKey() *shared.EntityKey {
	if (p.action == shared.ActionSubscribe || p.action == shared.ActionUnsubscribe) && p.key.Validate() == nil {
		return &p.key
	}
	return nil
}

// parseRequest is the frame decoder: it turns one client frame into a
// request or says precisely what is wrong with it. It does no I/O and holds
// no state, so it is fuzzed on its own (FuzzParseRequest).
func parseRequest(data []byte, maxIDLength int) (parsedRequest, *requestError) {
	var req request
	if err := json.Unmarshal(data, &req); err != nil {
		return parsedRequest{}, refuse(shared.CodeBadRequest, "frame is not a JSON request: %v", err)
	}
	p := parsedRequest{action: req.Action, ref: req.Ref}
	switch req.Action {
	case shared.ActionSubscribe, shared.ActionUnsubscribe:
		var body keyBody
		if err := json.Unmarshal(req.Body, &body); err != nil {
			return p, refuse(shared.CodeBadRequest, `%s body must be {"entity":"...","id":"..."}`, req.Action)
		}
		p.key = shared.EntityKey{Entity: body.Entity, ID: body.ID}
		var v string
		if req.Action == shared.ActionSubscribe && json.Unmarshal(body.Version, &v) == nil && shared.ValidVersion(v) {
			p.version = v
		}
		if err := p.key.Validate(); err != nil {
			return p, refuse(shared.CodeInvalidKey, "%v", err)
		}
		if len(p.key.ID) > maxIDLength {
			return p, refuse(shared.CodeInvalidKey, "id longer than %d bytes", maxIDLength)
		}
	case shared.ActionSecret:
		if err := json.Unmarshal(req.Body, &p.secret); err != nil {
			return p, refuse(shared.CodeBadRequest, "secret body must be a JSON string")
		}
	case "":
	default:
		// The action is not echoed: client input stays out of the logs.
		return p, refuse(shared.CodeUnknownAction, "unknown action; the actions are subscribe, unsubscribe and secret")
	}
	return p, nil
}

// Server -> client envelope frames, except the state frames (rows, gone,
// diff, unchanged), which frame.go builds byte by byte.
type (
	welcomeFrame struct {
		Type        string `json:"type"` // "welcome"
		Protocol    string `json:"protocol"`
		Limits      Limits `json:"limits"`
		HeartbeatMs int64  `json:"heartbeatMs"` // a heartbeat frame comes at least this often
	}
	revokedFrame struct {
		Type   string           `json:"type"` // "revoked"
		Key    shared.EntityKey `json:"key"`
		Reason string           `json:"reason"`
	}
	ackFrame struct {
		Type string `json:"type"` // "ack"
		Ref  string `json:"ref"`
	}
	errorFrame struct {
		Type    string            `json:"type"` // "error"
		Ref     string            `json:"ref,omitempty"`
		Code    shared.ErrorCode  `json:"code"`
		Message string            `json:"message"`
		Key     *shared.EntityKey `json:"key,omitempty"`
	}
)

// Limits are the limits the server enforces, announced in the welcome frame.
type Limits struct {
	MaxFrameBytes     int64 `json:"maxFrameBytes"`
	MaxSubscriptions  int   `json:"maxSubscriptions"`
	MessagesPerSecond int   `json:"messagesPerSecond"`
	MessageBurst      int   `json:"messageBurst"`
	MaxIDLength       int   `json:"maxIdLength"`
}
