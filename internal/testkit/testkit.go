// Package testkit holds what the project's tests share: a websocket test
// client that speaks the raw protocol, an in-memory entity store whose rows
// say which key and version they are, and a server harness around
// entitysync.
package testkit

import (
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/shared"
)

// WS is a raw-protocol websocket client for tests. Frames are read in the
// background into a channel.
type WS struct {
	t      testing.TB
	Conn   *websocket.Conn
	frames chan []byte
	// Closed is closed when the read loop ends; CloseErr tells why.
	Closed   chan struct{}
	CloseErr error
}

// Dial connects to a test server's websocket endpoint.
func Dial(t testing.TB, srv *httptest.Server) *WS {
	t.Helper()
	return DialURL(t, "ws"+strings.TrimPrefix(srv.URL, "http")+"/ws/entity-sync/")
}

// DialURL connects to a websocket URL.
func DialURL(t testing.TB, url string) *WS {
	t.Helper()
	conn, _, err := websocket.DefaultDialer.Dial(url, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	w := &WS{t: t, Conn: conn, frames: make(chan []byte, 4096), Closed: make(chan struct{})}
	go func() {
		defer close(w.Closed)
		for {
			_, b, err := conn.ReadMessage()
			if err != nil {
				w.CloseErr = err
				return
			}
			w.frames <- b
		}
	}()
	t.Cleanup(func() { conn.Close(); <-w.Closed })
	return w
}

// Send writes v as a JSON text frame.
func (w *WS) Send(v any) {
	w.t.Helper()
	if err := w.Conn.WriteJSON(v); err != nil {
		w.t.Fatalf("send: %v", err)
	}
}

// SendRaw writes b as a text frame.
func (w *WS) SendRaw(b []byte) {
	w.t.Helper()
	if err := w.Conn.WriteMessage(websocket.TextMessage, b); err != nil {
		w.t.Fatalf("send: %v", err)
	}
}

// Subscribe sends a subscribe request.
func (w *WS) Subscribe(entity, id string) {
	w.t.Helper()
	w.Send(map[string]any{"action": "subscribe", "body": shared.EntityKey{Entity: shared.EntityType(entity), ID: id}})
}

// Unsubscribe sends an unsubscribe request.
func (w *WS) Unsubscribe(entity, id string) {
	w.t.Helper()
	w.Send(map[string]any{"action": "unsubscribe", "body": shared.EntityKey{Entity: shared.EntityType(entity), ID: id}})
}

// SetSecret sends a secret request.
func (w *WS) SetSecret(secret string) {
	w.t.Helper()
	w.Send(map[string]any{"action": "secret", "body": secret})
}

// Next returns the next frame, or false after timeout.
func (w *WS) Next(timeout time.Duration) ([]byte, bool) {
	select {
	case b := <-w.frames:
		return b, true
	case <-time.After(timeout):
		return nil, false
	}
}

// Await reads frames until one satisfies match and returns the frames read
// before it (not the matching one), failing the test after timeout.
func (w *WS) Await(timeout time.Duration, what string, match func(Row) bool) []Row {
	w.t.Helper()
	deadline := time.After(timeout)
	var before []Row
	for {
		select {
		case b := <-w.frames:
			r := ParseRow(b)
			if match(r) {
				return before
			}
			before = append(before, r)
		case <-deadline:
			w.t.Fatalf("timed out after %s waiting for %s; got %d other frames: %v", timeout, what, len(before), before)
			return nil
		}
	}
}

// AwaitKeys reads frames until it has seen a row of each key (in any order),
// failing the test after timeout. Every frame read is consumed.
func (w *WS) AwaitKeys(timeout time.Duration, keys ...shared.EntityKey) {
	w.t.Helper()
	anyVersion := make(map[shared.EntityKey]int, len(keys))
	for _, k := range keys {
		anyVersion[k] = 0
	}
	w.AwaitVersions(timeout, anyVersion)
}

// AwaitVersions reads frames until it has seen, for each key of want, a row
// at that version or later, in any order (different keys' pushes are not
// ordered), failing the test after timeout. Every frame read is consumed.
func (w *WS) AwaitVersions(timeout time.Duration, want map[shared.EntityKey]int) {
	w.t.Helper()
	missing := make(map[shared.EntityKey]int, len(want))
	for k, v := range want {
		missing[k] = v
	}
	deadline := time.After(timeout)
	for len(missing) > 0 {
		select {
		case b := <-w.frames:
			r := ParseRow(b)
			if v, ok := missing[r.Key()]; ok && r.Version >= v {
				delete(missing, r.Key())
			}
		case <-deadline:
			w.t.Fatalf("timed out after %s waiting for %d keys at their versions, e.g. %v", timeout, len(missing), firstOf(missing))
		}
	}
}

func firstOf(m map[shared.EntityKey]int) string {
	for k, v := range m {
		return fmt.Sprintf("%s v%d", k, v)
	}
	return ""
}

// Row is the shape of the rows the test store emits.
type Row struct {
	Entity  string `json:"entity"`
	ID      string `json:"id"`
	Version int    `json:"v"`
	Part    int    `json:"part,omitempty"`
	Secret  string `json:"secret,omitempty"`
	Raw     []byte `json:"-"`
}

// Key returns the row's key.
func (r Row) Key() shared.EntityKey {
	return shared.EntityKey{Entity: shared.EntityType(r.Entity), ID: r.ID}
}

// ParseRow decodes a frame sent by a Store; frames of another shape yield a
// zero Row with Raw set.
func ParseRow(b []byte) Row {
	var r Row
	_ = json.Unmarshal(b, &r)
	r.Raw = b
	return r
}

// Is matches a row of key at version v or later.
func Is(entity, id string, v int) func(Row) bool {
	return func(r Row) bool { return r.Entity == entity && r.ID == id && r.Version >= v }
}
