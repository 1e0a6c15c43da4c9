package esweb_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/esweb"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// frame is a server frame of the envelope protocol with the fields of
// state frames.
type frame struct {
	Type    string            `json:"type"`
	Key     shared.EntityKey  `json:"key"`
	Seq     uint64            `json:"seq"`
	Version string            `json:"version"`
	Base    string            `json:"base"`
	IDs     []string          `json:"ids"`
	Rows    []json.RawMessage `json:"rows"`
	Upsert  []struct {
		ID  string          `json:"id"`
		Row json.RawMessage `json:"row"`
	} `json:"upsert"`
	Remove []string `json:"remove"`
	Order  []string `json:"order"`
	Ref    string   `json:"ref"`
	Code   string   `json:"code"`
	raw    []byte
}

// held is what a client holds of one collection key, kept the way
// docs/protocol.md says a client applies state frames.
type held struct {
	version string
	ids     []string
	rows    map[string]string
}

// apply applies a rows, gone, diff or unchanged frame, or says why it
// cannot.
func (h *held) apply(f frame) error {
	switch f.Type {
	case "rows", "gone":
		if len(f.IDs) != len(f.Rows) {
			return fmt.Errorf("%d ids for %d rows", len(f.IDs), len(f.Rows))
		}
		h.ids, h.rows = slices.Clone(f.IDs), make(map[string]string, len(f.IDs))
		for i, id := range f.IDs {
			h.rows[id] = string(f.Rows[i])
		}
	case "unchanged":
		if f.Version != h.version {
			return fmt.Errorf("unchanged at %s, held %s", f.Version, h.version)
		}
	case "diff":
		if f.Base != h.version {
			return fmt.Errorf("diff from %s, held %s", f.Base, h.version)
		}
		for _, id := range f.Remove {
			delete(h.rows, id)
			h.ids = slices.DeleteFunc(h.ids, func(x string) bool { return x == id })
		}
		for _, u := range f.Upsert {
			if _, ok := h.rows[u.ID]; !ok {
				h.ids = append(h.ids, u.ID)
			}
			h.rows[u.ID] = string(u.Row)
		}
		if f.Order != nil {
			h.ids = slices.Clone(f.Order)
		}
	default:
		return fmt.Errorf("not a state frame: %s", f.raw)
	}
	h.version = f.Version
	return nil
}

// list returns the held rows in order.
func (h *held) list() [][]byte {
	out := make([][]byte, len(h.ids))
	for i, id := range h.ids {
		out[i] = []byte(h.rows[id])
	}
	return out
}

// envClient is an envelope-protocol test connection.
type envClient struct {
	t *testing.T
	c *websocket.Conn
}

func dialEnv(t *testing.T, srv *httptest.Server) *envClient {
	t.Helper()
	c, next := dialEnvelope(t, srv.URL)
	if w := next(); w.Type != "welcome" {
		t.Fatalf("got %+v, want welcome", w)
	}
	return &envClient{t: t, c: c}
}

func (e *envClient) send(s string) {
	e.t.Helper()
	if err := e.c.WriteMessage(websocket.TextMessage, []byte(s)); err != nil {
		e.t.Fatal(err)
	}
}

func (e *envClient) subscribe(ref, list, version string) {
	e.t.Helper()
	v := ""
	if version != "" {
		v = `,"version":"` + version + `"`
	}
	e.send(`{"action":"subscribe","ref":"` + ref + `","body":{"entity":"lists","id":"` + list + `"` + v + `}}`)
}

func (e *envClient) next() frame {
	e.t.Helper()
	_ = e.c.SetReadDeadline(time.Now().Add(wait))
	_, b, err := e.c.ReadMessage()
	if err != nil {
		e.t.Fatalf("read: %v", err)
	}
	var f frame
	if err := json.Unmarshal(b, &f); err != nil {
		e.t.Fatalf("frame %s: %v", b, err)
	}
	f.raw = b
	return f
}

// expect reads the next frame and checks its type.
func (e *envClient) expect(typ string) frame {
	e.t.Helper()
	f := e.next()
	if f.Type != typ {
		e.t.Fatalf("got %s, want a %s frame", f.raw, typ)
	}
	return f
}

func serveCollection(t *testing.T, opts esweb.Options) (*es.EntitySync, *httptest.Server, *testkit.Collection) {
	t.Helper()
	store := testkit.NewCollection()
	e, srv := testkit.Serve(t, es.Config{Logger: testkit.SilentLogger(), Web: opts})
	if err := e.RegisterCollection("lists", store.Fetch, esdb.JSONField("id")); err != nil {
		t.Fatal(err)
	}
	return e, srv, store
}

var list1 = shared.EntityKey{Entity: "lists", ID: "1"}

func equalRows(a, b [][]byte) bool {
	return slices.EqualFunc(a, b, bytes.Equal)
}

// A collection key: the first state in full with ids and its version, then
// each change as a diff from the state the client holds, which applied as
// docs/protocol.md says gives the fetch's rows, order included.
func TestCollectionDiffs(t *testing.T) {
	e, srv, store := serveCollection(t, esweb.Options{})
	store.Fill("1", 20, 40)
	cl := dialEnv(t, srv)
	cl.subscribe("s", "1", "")
	cl.expect("ack")
	f := cl.expect("rows")
	want := store.Rows("1")
	if f.Version != shared.Version(want) || len(f.IDs) != 20 || f.IDs[3] != "r3" {
		t.Fatalf("first state %s: want version %s and the rows' ids", f.raw, shared.Version(want))
	}
	var h held
	if err := h.apply(f); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name   string
		change func()
		check  func(f frame) string
	}{
		{"update in place", func() { store.Set("1", "r5", "changed") }, func(f frame) string {
			if len(f.Upsert) != 1 || f.Upsert[0].ID != "r5" || f.Remove != nil || f.Order != nil {
				return "want one upsert of r5, no remove, no order"
			}
			return ""
		}},
		{"append", func() { store.Set("1", "new", "appended") }, func(f frame) string {
			if len(f.Upsert) != 1 || f.Upsert[0].ID != "new" || f.Order != nil {
				return "want one upsert of new, no order"
			}
			return ""
		}},
		{"delete", func() { store.Delete("1", "r0") }, func(f frame) string {
			if !slices.Equal(f.Remove, []string{"r0"}) || f.Upsert != nil || f.Order != nil {
				return "want remove r0 only"
			}
			return ""
		}},
		{"insert in the middle", func() { store.Insert("1", 4, "mid", "inserted") }, func(f frame) string {
			if len(f.Upsert) != 1 || len(f.Order) != 21 || f.Order[4] != "mid" {
				return "want one upsert and the order"
			}
			return ""
		}},
		{"move", func() { store.Move("1", "r7", 0) }, func(f frame) string {
			if f.Upsert != nil || f.Order == nil || f.Order[0] != "r7" {
				return "want the order alone"
			}
			return ""
		}},
	} {
		tc.change()
		if err := e.NotifyAllOfChange(list1); err != nil {
			t.Fatal(err)
		}
		f := cl.expect("diff")
		if f.Base != h.version {
			t.Fatalf("%s: diff from %s, client holds %s", tc.name, f.Base, h.version)
		}
		if msg := tc.check(f); msg != "" {
			t.Errorf("%s: %s: %s", tc.name, msg, f.raw)
		}
		if err := h.apply(f); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		want := store.Rows("1")
		if !equalRows(h.list(), want) || h.version != shared.Version(want) {
			t.Fatalf("%s: after the diff the client holds %s (version %s), want %s (%s)", tc.name, h.list(), h.version, want, shared.Version(want))
		}
	}

	// A change of most rows costs more as a diff than in full: sent in full.
	for i := 1; i < 20; i++ {
		store.Set("1", "r"+fmt.Sprint(i), "all new")
	}
	if err := e.NotifyAllOfChange(list1); err != nil {
		t.Fatal(err)
	}
	if f := cl.expect("rows"); h.apply(f) != nil || !equalRows(h.list(), store.Rows("1")) {
		t.Fatalf("full state %s", f.raw)
	}
	// Zero rows: gone, with the version of no rows.
	for _, id := range slices.Clone(h.ids) {
		store.Delete("1", id)
	}
	if err := e.NotifyAllOfChange(list1); err != nil {
		t.Fatal(err)
	}
	if f := cl.expect("gone"); f.Version != shared.Version(nil) {
		t.Fatalf("gone %s, want version %s", f.raw, shared.Version(nil))
	}
}

// Keys that are not collections keep their frames, plus a version.
func TestVersionOnEveryStateFrame(t *testing.T) {
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, es.Config{Logger: testkit.SilentLogger()})
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	cl := dialEnv(t, srv)
	cl.send(`{"action":"subscribe","ref":"s","body":{"entity":"items","id":"1"}}`)
	cl.expect("ack")
	f := cl.expect("rows")
	k := shared.EntityKey{Entity: "items", ID: "1"}
	if f.Version != shared.Version(store.Rows(k, "")) || f.IDs != nil {
		t.Fatalf("got %s, want version %s and no ids", f.raw, shared.Version(store.Rows(k, "")))
	}
}

// The diff for one change is made and encoded once, and every client at
// that base is sent the same bytes.
func TestDiffSharedAcrossClients(t *testing.T) {
	e, srv, store := serveCollection(t, esweb.Options{})
	store.Fill("1", 50, 40)
	var clients []*envClient
	for i := 0; i < 3; i++ {
		cl := dialEnv(t, srv)
		cl.subscribe("s", "1", "")
		cl.expect("ack")
		cl.expect("rows")
		clients = append(clients, cl)
	}
	store.Set("1", "r9", "changed")
	if err := e.NotifyAllOfChange(list1); err != nil {
		t.Fatal(err)
	}
	var first []byte
	for i, cl := range clients {
		f := cl.expect("diff")
		if i == 0 {
			first = f.raw
		} else if !bytes.Equal(f.raw, first) {
			t.Errorf("client %d got %s, client 0 %s", i, f.raw, first)
		}
	}
}

// Resume: a subscribe carrying the current version is answered with
// "unchanged" (after the ack); one carrying a version the server still
// keeps, with a diff from it; anything else, with the full state.
func TestResume(t *testing.T) {
	e, srv, store := serveCollection(t, esweb.Options{})
	store.Fill("1", 30, 40)
	keeper := dialEnv(t, srv) // keeps the key, and its history, on the server
	keeper.subscribe("k", "1", "")
	keeper.expect("ack")
	var h held
	if err := h.apply(keeper.expect("rows")); err != nil {
		t.Fatal(err)
	}
	v1 := h.version

	cl := dialEnv(t, srv)
	cl.subscribe("r1", "1", v1)
	cl.expect("ack")
	if f := cl.expect("unchanged"); f.Version != v1 || f.Key != list1 || f.Seq == 0 {
		t.Fatalf("got %s, want unchanged at %s", f.raw, v1)
	}

	store.Set("1", "r3", "changed while the client was away")
	if err := e.NotifyAllOfChange(list1); err != nil {
		t.Fatal(err)
	}
	if err := h.apply(keeper.expect("diff")); err != nil {
		t.Fatal(err)
	}
	back := dialEnv(t, srv)
	back.subscribe("r2", "1", v1)
	back.expect("ack")
	f := back.expect("diff")
	if f.Base != v1 || f.Version != h.version || len(f.Upsert) != 1 {
		t.Fatalf("got %s, want a diff from %s to %s", f.raw, v1, h.version)
	}

	for _, v := range []string{`"0000000000000000"`, `"not a version"`, `42`, `{"x":1}`} {
		other := dialEnv(t, srv)
		other.send(`{"action":"subscribe","ref":"u","body":{"entity":"lists","id":"1","version":` + v + `}}`)
		other.expect("ack")
		if f := other.expect("rows"); f.Version != h.version {
			t.Errorf("version %s: got %s, want the full state", v, f.raw)
		}
	}

	// The raw dialect ignores the version.
	ws := testkit.Dial(t, srv)
	ws.Send(map[string]any{"action": "subscribe", "body": map[string]string{"entity": "lists", "id": "1", "version": h.version}})
	if b, ok := ws.Next(wait); !ok || !bytes.Equal(b, store.Rows("1")[0]) {
		t.Fatalf("raw client got %s, want the first row", b)
	}
}

// The key's first state, fetched after the subscribe, is compared with the
// version the client sent too: a client that reconnects to a server that
// holds nothing of the key gets "unchanged" when nothing changed.
func TestResumeOnFirstFetch(t *testing.T) {
	_, srv, store := serveCollection(t, esweb.Options{})
	store.Fill("1", 10, 20)
	cl := dialEnv(t, srv)
	cl.subscribe("r", "1", shared.Version(store.Rows("1")))
	cl.expect("ack")
	cl.expect("unchanged")
}

// With DisableDiffs every state goes in full, and a resume gets rows.
func TestDisableDiffs(t *testing.T) {
	e, srv, store := serveCollection(t, esweb.Options{DisableDiffs: true})
	store.Fill("1", 10, 20)
	cl := dialEnv(t, srv)
	cl.subscribe("r", "1", shared.Version(store.Rows("1")))
	cl.expect("ack")
	cl.expect("rows")
	store.Set("1", "r1", "x")
	if err := e.NotifyAllOfChange(list1); err != nil {
		t.Fatal(err)
	}
	cl.expect("rows")
}

// Rows whose id is missing, unreadable or repeated are an application bug:
// they get "#<index>" so that clients can still key rows by id, and the
// server keeps serving.
func TestBadRowIDs(t *testing.T) {
	rows := [][]byte{
		[]byte(`{"id":"a"}`),
		[]byte(`{"name":"no id"}`),
		[]byte(`{"id":"a","dup":true}`),
		[]byte(`not json`),
		[]byte(`{"id":""}`),
		[]byte(`{"id":7}`),
		[]byte(`{"id":"#1"}`), // reads like a synthetic id: the bad row 1 gets another
	}
	e, srv := testkit.Serve(t, es.Config{Logger: testkit.SilentLogger()})
	fetch := func(_ context.Context, _ shared.EntityKey) ([][]byte, error) { return rows, nil }
	if err := e.RegisterCollection("lists", fetch, esdb.JSONField("id")); err != nil {
		t.Fatal(err)
	}
	cl := dialEnv(t, srv)
	cl.subscribe("s", "1", "")
	cl.expect("ack")
	f := cl.expect("rows")
	want := []string{"a", "#1~1", "#2", "#3", "#4", "7", "#1"}
	if !slices.Equal(f.IDs, want) {
		t.Fatalf("ids %q, want %q", f.IDs, want)
	}
	if string(f.Rows[3]) != `"not json"` {
		t.Errorf("non-JSON row embedded as %s", f.Rows[3])
	}
}
