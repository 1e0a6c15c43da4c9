package esweb_test

import (
	"context"
	"encoding/json"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// envelope is any server frame of the envelope protocol.
type envelope struct {
	Type     string            `json:"type"`
	Protocol string            `json:"protocol"`
	Limits   map[string]any    `json:"limits"`
	Key      shared.EntityKey  `json:"key"`
	Seq      uint64            `json:"seq"`
	Rows     []json.RawMessage `json:"rows"`
	Ref      string            `json:"ref"`
	Code     string            `json:"code"`
	Message  string            `json:"message"`
}

func dialEnvelope(t *testing.T, url string) (*websocket.Conn, func() envelope) {
	t.Helper()
	d := websocket.Dialer{Subprotocols: []string{shared.Subprotocol}}
	c, resp, err := d.Dial("ws"+strings.TrimPrefix(url, "http")+shared.WebsocketPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if got := resp.Header.Get("Sec-WebSocket-Protocol"); got != shared.Subprotocol {
		t.Fatalf("server chose subprotocol %q", got)
	}
	next := func() envelope {
		t.Helper()
		_ = c.SetReadDeadline(time.Now().Add(wait))
		var e envelope
		if err := c.ReadJSON(&e); err != nil {
			t.Fatalf("read: %v", err)
		}
		return e
	}
	return c, next
}

func TestEnvelopeProtocol(t *testing.T) {
	var gone atomic.Bool
	e, srv := testkit.Serve(t, es.Config{})
	err := e.Register("items", func(_ context.Context, k shared.EntityKey) ([][]byte, error) {
		if gone.Load() {
			return nil, nil
		}
		return [][]byte{[]byte(`{"id":"` + k.ID + `"}`), []byte(`{"part":2}`), []byte("not json")}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	c, next := dialEnvelope(t, srv.URL)

	if w := next(); w.Type != "welcome" || w.Protocol != shared.Subprotocol || w.Limits["maxFrameBytes"] == nil {
		t.Fatalf("first frame %+v, want welcome with limits", w)
	}

	send := func(s string) {
		t.Helper()
		if err := c.WriteMessage(websocket.TextMessage, []byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	send(`{"action":"subscribe","ref":"s1","body":{"entity":"items","id":"1"}}`)
	if a := next(); a.Type != "ack" || a.Ref != "s1" {
		t.Fatalf("got %+v, want ack s1", a)
	}
	rows := next()
	if rows.Type != "rows" || rows.Key != (shared.EntityKey{Entity: "items", ID: "1"}) || len(rows.Rows) != 3 || rows.Seq == 0 {
		t.Fatalf("got %+v, want all three rows of items/1 in one frame", rows)
	}
	if string(rows.Rows[0]) != `{"id":"1"}` || string(rows.Rows[2]) != `"not json"` {
		t.Errorf("rows embedded as %s", rows.Rows)
	}

	for _, tc := range []struct{ frame, code string }{
		{`{"action":"subscribe","ref":"e1","body":"x"}`, "bad_request"},
		{`{"action":"subscribe","ref":"e2","body":{"entity":"items","id":""}}`, "invalid_key"},
		{`{"action":"subscribe","ref":"e3","body":{"entity":"nope","id":"1"}}`, "unknown_entity"},
		{`{"action":"fly","ref":"e4"}`, "unknown_action"},
		{`{"action":"secret","ref":"e5","body":1}`, "bad_request"},
	} {
		send(tc.frame)
		if got := next(); got.Type != "error" || got.Code != tc.code || got.Ref != tc.frame[strings.Index(tc.frame, `"ref":"`)+7:][:2] || got.Message == "" {
			t.Errorf("%s: got %+v, want error %s", tc.frame, got, tc.code)
		}
	}
	send(`not json`)
	if got := next(); got.Type != "error" || got.Code != "bad_request" || got.Ref != "" {
		t.Errorf("non-JSON frame: got %+v", got)
	}

	gone.Store(true)
	if err := e.NotifyAllOfChange(shared.EntityKey{Entity: "items", ID: "1"}); err != nil {
		t.Fatal(err)
	}
	if g := next(); g.Type != "gone" || g.Key.ID != "1" || g.Seq <= rows.Seq {
		t.Fatalf("got %+v, want gone with a higher seq than %d", g, rows.Seq)
	}

	send(`{"action":"unsubscribe","ref":"u1","body":{"entity":"items","id":"1"}}`)
	if a := next(); a.Type != "ack" || a.Ref != "u1" {
		t.Fatalf("got %+v, want ack u1", a)
	}
}

func TestRawClientsGetNoEnvelope(t *testing.T) {
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, es.Config{})
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	ws := testkit.Dial(t, srv)
	ws.Send(map[string]any{"action": "subscribe", "ref": "r", "body": map[string]string{"entity": "items", "id": "1"}})
	b, ok := ws.Next(wait)
	if !ok {
		t.Fatal("no frame")
	}
	if r := testkit.ParseRow(b); r.ID != "1" {
		t.Fatalf("raw client got %s, want the row itself", b)
	}
}
