package esweb_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// oddRows are rows as databases produce them and json.Marshal would not
// leave alone: spaces after colons and commas (Postgres's jsonb::text), <,
// > and & (escaped as \u003c etc.), U+2028 and U+2029 (escaped as
// \u2028), a string escape written another way, space inside a value.
func oddRows() [][]byte {
	rows := [][]byte{
		[]byte(`{"id":"a", "n": 2}`),
		[]byte(`{"id":"b","s":"<&>"}`),
		[]byte(`{"id":"c","u":"` + "\u2028\u2029" + `"}`),
		[]byte(`{ "id" : "d", "e": "\u00e9\/", "l": [1, 2.50, 1e3] }`),
	}
	// Enough plain rows that a change of a few is sent as a diff.
	for i := range 20 {
		rows = append(rows, fmt.Appendf(nil, `{"id": "p%d", "pad": "some text to make the full state bigger"}`, i))
	}
	return rows
}

// rowsStore serves the same rows to every key of "items" (plain) and
// "lists" (a collection, by "id").
type rowsStore struct {
	mu   sync.Mutex
	rows [][]byte
}

func (s *rowsStore) fetch(context.Context, shared.EntityKey) ([][]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rows, nil
}

func (s *rowsStore) set(rows [][]byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rows = rows
}

// serveRows serves store's rows as "items" (plain) and "lists" (a
// collection, by "id").
func serveRows(t *testing.T, store *rowsStore) (*es.EntitySync, *httptest.Server) {
	t.Helper()
	e, srv := testkit.Serve(t, es.Config{Logger: testkit.SilentLogger()})
	if err := e.Register("items", store.fetch); err != nil {
		t.Fatal(err)
	}
	if err := e.RegisterCollection("lists", store.fetch, esdb.JSONField("id")); err != nil {
		t.Fatal(err)
	}
	return e, srv
}

// In the envelope dialect every row is embedded in rows frames and diff
// upserts exactly as fetched, so the frame's version, computed over the
// fetched rows, is the version of the rows the client received.
func TestEnvelopeRowsAsFetched(t *testing.T) {
	rows := oddRows()
	store := &rowsStore{rows: rows}
	e, srv := serveRows(t, store)
	cl := dialEnv(t, srv)
	// exact checks that each of want appears in the frame as it is, and
	// that the version is theirs.
	exact := func(f frame, got []json.RawMessage, want [][]byte) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("%d rows in %s, want %d", len(got), f.raw, len(want))
		}
		for i, r := range got {
			if !bytes.Equal(r, want[i]) || !bytes.Contains(f.raw, want[i]) {
				t.Errorf("row %d arrived as %s, was fetched as %s", i, r, want[i])
			}
		}
	}

	cl.send(`{"action":"subscribe","ref":"i","body":{"entity":"items","id":"1"}}`)
	cl.expect("ack")
	f := cl.expect("rows")
	exact(f, f.Rows, rows)
	if f.Version != shared.Version(rows) {
		t.Errorf("version %s, want %s", f.Version, shared.Version(rows))
	}

	cl.subscribe("l", "1", "")
	cl.expect("ack")
	f = cl.expect("rows")
	exact(f, f.Rows, rows)
	var h held
	if err := h.apply(f); err != nil {
		t.Fatal(err)
	}

	// A diff: b changed, e added, both written the odd way.
	next := slices.Clone(rows)
	next[1] = []byte(`{"id":"b", "s": "<&> & more"}`)
	next = append(next, []byte(`{"id": "e",  "t":"`+"\u2028"+`<b>"}`))
	store.set(next)
	if err := e.NotifyAllOfChange(list1); err != nil {
		t.Fatal(err)
	}
	var d frame
	for d.Type != "diff" { // items/1 changed too: its rows frame may come first
		if d = cl.next(); d.Type != "diff" && d.Type != "rows" {
			t.Fatalf("got %s, want a rows and a diff frame", d.raw)
		}
	}
	upserts := make([]json.RawMessage, len(d.Upsert))
	for i, u := range d.Upsert {
		upserts[i] = u.Row
	}
	exact(d, upserts, [][]byte{next[1], next[len(next)-1]})
	if err := h.apply(d); err != nil {
		t.Fatal(err)
	}
	if !equalRows(h.list(), next) || shared.Version(h.list()) != d.Version {
		t.Fatalf("after the diff the client holds rows of version %s, want %s", shared.Version(h.list()), d.Version)
	}
}

// In the raw dialect each row is its own frame, exactly as fetched.
func TestRawRowsAsFetched(t *testing.T) {
	rows := oddRows()
	_, srv := serveRows(t, &rowsStore{rows: rows})
	ws := testkit.Dial(t, srv)
	ws.Send(map[string]any{"action": "subscribe", "body": map[string]string{"entity": "items", "id": "1"}})
	for i, want := range rows {
		got, ok := ws.Next(wait)
		if !ok {
			t.Fatalf("no frame for row %d", i)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("row %d arrived as %s, was fetched as %s", i, got, want)
		}
	}
}
