package esweb_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/gorilla/websocket"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// A fetch that returns invalid UTF-8 (here inside JSON strings, which
// json.Valid accepts, and in a row that is not JSON) must not put it in a
// text frame in either dialect: browsers and the ws package fail such a
// connection (RFC 6455, section 8.1). Each run of invalid bytes arrives as
// U+FFFD.
func TestTextFramesAreValidUTF8(t *testing.T) {
	rows := [][]byte{
		[]byte("{\"name\":\"caf\xc3\"}"),
		[]byte("{\"city\":\"K\xf6ln\"}"),
		[]byte("not json \xff"),
	}
	want := []string{
		`{"name":"caf` + "\uFFFD" + `"}`,
		`{"city":"K` + "\uFFFD" + `ln"}`,
		"not json \uFFFD",
	}
	e, srv := testkit.Serve(t, es.Config{})
	if err := e.Register("items", func(context.Context, shared.EntityKey) ([][]byte, error) { return rows, nil }); err != nil {
		t.Fatal(err)
	}
	dial := func(t *testing.T, subprotocols ...string) *websocket.Conn {
		t.Helper()
		d := websocket.Dialer{Subprotocols: subprotocols}
		c, _, err := d.Dial("ws"+strings.TrimPrefix(srv.URL, "http")+shared.WebsocketPath, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if err := c.WriteMessage(websocket.TextMessage, []byte(`{"action":"subscribe","ref":"s","body":{"entity":"items","id":"1"}}`)); err != nil {
			t.Fatal(err)
		}
		return c
	}
	// read returns the next text frame's payload as it came off the wire.
	read := func(t *testing.T, c *websocket.Conn) []byte {
		t.Helper()
		_ = c.SetReadDeadline(time.Now().Add(wait))
		typ, b, err := c.ReadMessage()
		if err != nil || typ != websocket.TextMessage {
			t.Fatalf("read: type %d, %v", typ, err)
		}
		if !utf8.Valid(b) {
			t.Fatalf("text frame holds invalid UTF-8: %q", b)
		}
		return b
	}

	t.Run("envelope", func(t *testing.T) {
		c := dial(t, shared.Subprotocol)
		read(t, c) // welcome
		read(t, c) // ack
		b := read(t, c)
		var f struct {
			Type string            `json:"type"`
			Rows []json.RawMessage `json:"rows"`
		}
		if err := json.Unmarshal(b, &f); err != nil || f.Type != "rows" || len(f.Rows) != len(want) {
			t.Fatalf("got %s (%v), want a rows frame of %d rows", b, err, len(want))
		}
		for i, r := range f.Rows[:2] {
			if string(r) != want[i] {
				t.Errorf("row %d: got %s, want %s", i, r, want[i])
			}
		}
		var s string
		if err := json.Unmarshal(f.Rows[2], &s); err != nil || s != want[2] {
			t.Errorf("the row that is not JSON: got %s, want it as a JSON string of %q", f.Rows[2], want[2])
		}
	})
	t.Run("raw", func(t *testing.T) {
		c := dial(t)
		for i, w := range want {
			if got := read(t, c); string(got) != w {
				t.Errorf("row %d: got %q, want %q", i, got, w)
			}
		}
	})
}
