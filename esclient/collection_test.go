package esclient_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esclient"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// collectionServer serves the collection entity type "lists" over store.
func collectionServer(t *testing.T, store *testkit.Collection) (*entitysync.EntitySync, string) {
	t.Helper()
	e, srv := testkit.Serve(t, entitysync.Config{Logger: testkit.SilentLogger()})
	if err := e.RegisterCollection("lists", store.Fetch, esdb.JSONField("id")); err != nil {
		t.Fatal(err)
	}
	return e, wsURL(srv.URL)
}

// snapshots records a subscription's Changes callbacks.
type snapshots struct {
	t  *testing.T
	ch chan esclient.Snapshot
}

func newSnapshots(t *testing.T) *snapshots {
	return &snapshots{t: t, ch: make(chan esclient.Snapshot, 256)}
}

func (s *snapshots) handlers() esclient.Handlers {
	return esclient.Handlers{Changes: func(snap esclient.Snapshot) { s.ch <- snap }}
}

func (s *snapshots) next() esclient.Snapshot {
	s.t.Helper()
	select {
	case snap := <-s.ch:
		return snap
	case <-time.After(wait):
		s.t.Fatal("no Changes callback")
		return esclient.Snapshot{}
	}
}

func (s *snapshots) none() {
	s.t.Helper()
	select {
	case snap := <-s.ch:
		s.t.Fatalf("unexpected Changes callback %s", describe(snap.Changes))
	default:
	}
}

// describe renders changes as "added:a modified:b".
func describe(changes []esclient.Change) string {
	parts := make([]string, len(changes))
	for i, c := range changes {
		parts[i] = string(c.Type) + ":" + c.ID
	}
	return strings.Join(parts, " ")
}

// sameRows reports whether a client's rows are the fetch's.
func sameRows(got []json.RawMessage, want [][]byte) bool {
	return slices.EqualFunc(got, want, func(a json.RawMessage, b []byte) bool { return bytes.Equal(a, b) })
}

// A collection's subscriber is handed its rows in order with their ids, and
// what changed: everything added first, then each change by id.
func TestCollectionChanges(t *testing.T) {
	store := testkit.NewCollection()
	store.Fill("1", 3, 10)
	e, url := collectionServer(t, store)
	c := dial(t, url, fast(esclient.Options{}))
	s := newSnapshots(t)
	if _, err := c.SubscribeWith(key("lists", "1"), s.handlers()); err != nil {
		t.Fatal(err)
	}
	check := func(what, want string) {
		t.Helper()
		snap := s.next()
		if got := describe(snap.Changes); got != want {
			t.Fatalf("%s: changes %q, want %q", what, got, want)
		}
		rows := store.Rows("1")
		if !sameRows(snap.Rows, rows) || snap.Version != shared.Version(rows) || len(snap.IDs) != len(rows) {
			t.Fatalf("%s: rows %s (version %s), want %s", what, snap.Rows, snap.Version, rows)
		}
	}
	check("first state", "added:r0 added:r1 added:r2")
	for _, step := range []struct {
		what, want string
		change     func()
	}{
		{"update", "modified:r1", func() { store.Set("1", "r1", "x") }},
		{"insert", "added:new", func() { store.Insert("1", 1, "new", "y") }},
		{"delete", "removed:r0", func() { store.Delete("1", "r0") }},
		{"move", "", func() { store.Move("1", "r2", 0) }},
	} {
		step.change()
		if err := e.NotifyAllOfChange(key("lists", "1")); err != nil {
			t.Fatal(err)
		}
		check(step.what, step.want)
	}
	// A second subscription to the key gets the state at once, all added.
	s2 := newSnapshots(t)
	if _, err := c.SubscribeWith(key("lists", "1"), s2.handlers()); err != nil {
		t.Fatal(err)
	}
	if got := describe(s2.next().Changes); got != "added:r2 added:new added:r1" {
		t.Fatalf("joining subscription: %q", got)
	}
}

// tap records the bytes a client reads from its connections, so a test can
// see which frames the server sent.
type tap struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (tp *tap) dialer() *websocket.Dialer {
	return &websocket.Dialer{NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &tapConn{Conn: c, tp: tp}, nil
	}}
}

// take returns what was read since the last take.
func (tp *tap) take() string {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	s := tp.buf.String()
	tp.buf.Reset()
	return s
}

type tapConn struct {
	net.Conn
	tp *tap
}

func (c *tapConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.tp.mu.Lock()
	c.tp.buf.Write(b[:n])
	c.tp.mu.Unlock()
	return n, err
}

// On every reconnect the client subscribes again with the version it holds:
// nothing changed, the server says "unchanged" and the application hears
// nothing; one row changed, it gets a diff and one change.
func TestResumeOnReconnect(t *testing.T) {
	store := testkit.NewCollection()
	store.Fill("1", 40, 30)
	e, url := collectionServer(t, store)
	p := startProxy(t, strings.TrimPrefix(strings.TrimSuffix(url, shared.WebsocketPath), "ws://"))
	keeper := dial(t, url, fast(esclient.Options{})) // holds the key, and its history, on the server
	ks := newSnapshots(t)
	if _, err := keeper.SubscribeWith(key("lists", "1"), ks.handlers()); err != nil {
		t.Fatal(err)
	}
	ks.next()

	var tp tap
	st := newStates(t)
	c := dial(t, "ws://"+p.Addr()+shared.WebsocketPath, fast(esclient.Options{Dialer: tp.dialer(), OnState: st.onState}))
	s := newSnapshots(t)
	if _, err := c.SubscribeWith(key("lists", "1"), s.handlers()); err != nil {
		t.Fatal(err)
	}
	s.next()
	tp.take()                // the first state, in full
	fence := newSnapshots(t) // a key subscribed after the reconnect: its state comes after the resubscribe's answer

	p.Cut()
	st.await(esclient.Disconnected)
	st.await(esclient.Connected)
	if _, err := c.SubscribeWith(key("lists", "fence"), fence.handlers()); err != nil {
		t.Fatal(err)
	}
	fence.next()
	s.none()
	if got := tp.take(); !strings.Contains(got, `"type":"unchanged"`) || strings.Contains(got, `"r39"`) {
		t.Fatalf("after a reconnect with nothing changed the server sent %.300q..., want unchanged and no rows", got)
	}

	p.SetDown(true)
	p.Cut()
	st.await(esclient.Disconnected)
	store.Set("1", "r7", "changed while away")
	if err := e.NotifyAllOfChange(key("lists", "1")); err != nil {
		t.Fatal(err)
	}
	ks.next() // the server has the new state
	p.SetDown(false)
	snap := s.next()
	if got := describe(snap.Changes); got != "modified:r7" || !sameRows(snap.Rows, store.Rows("1")) {
		t.Fatalf("after the reconnect: changes %q, rows %d", got, len(snap.Rows))
	}
	if got := tp.take(); !strings.Contains(got, `"type":"diff"`) || strings.Contains(got, `"r39"`) {
		t.Fatalf("after a reconnect with one row changed the server sent %.300q..., want a diff", got)
	}
}

// A diff from a state the client does not hold is never applied: the client
// subscribes again with the version it holds (once, however many such
// diffs arrive before the answer), and the answer brings it up to date.
func TestDiffFromAnotherBaseResubscribes(t *testing.T) {
	f := startFake(t)
	c := dial(t, f.url, fast(esclient.Options{}))
	fc := f.accept()
	k := key("lists", "1")
	s := newSnapshots(t)
	if _, err := c.SubscribeWith(k, s.handlers()); err != nil {
		t.Fatal(err)
	}
	fc.ack(fc.expect("subscribe", k))
	fc.send(map[string]any{"type": "rows", "key": k, "seq": 1, "version": "v1", "ids": []string{"a", "b"}, "rows": []any{map[string]string{"id": "a"}, map[string]string{"id": "b"}}})
	if got := describe(s.next().Changes); got != "added:a added:b" {
		t.Fatalf("first state: %q", got)
	}
	diff := func(seq int, base, version string, upsert ...string) {
		var ups []any
		for _, id := range upsert {
			ups = append(ups, map[string]any{"id": id, "row": map[string]string{"id": id, "n": fmt.Sprint(seq)}})
		}
		fc.send(map[string]any{"type": "diff", "key": k, "seq": seq, "base": base, "version": version, "upsert": ups})
	}
	diff(2, "other", "v3", "c")
	req := fc.expect("subscribe", k)
	var body struct{ Version string }
	if err := json.Unmarshal(req.Body, &body); err != nil || body.Version != "v1" {
		t.Fatalf("resubscribe body %s, want version v1", req.Body)
	}
	diff(3, "v2", "v3", "c") // still not from v1: no second resubscribe
	if _, err := c.SubscribeWith(key("lists", "fence"), esclient.Handlers{}); err != nil {
		t.Fatal(err)
	}
	fc.noRequestBefore(key("lists", "fence"))
	s.none()
	fc.ack(req)
	diff(4, "v1", "v4", "b")
	if got := describe(s.next().Changes); got != "modified:b" {
		t.Fatalf("the answer's diff: %q", got)
	}
	// The held version is now v4: a diff from it applies.
	diff(5, "v4", "v5", "c")
	if snap := s.next(); describe(snap.Changes) != "added:c" || !slices.Equal(snap.IDs, []string{"a", "b", "c"}) {
		t.Fatalf("got %q %v", describe(snap.Changes), snap.IDs)
	}
	// An empty diff back to the same version (the key came back to these
	// rows after states this client skipped) calls nothing, like
	// "unchanged"; the next one applies from it.
	diff(6, "v5", "v5")
	diff(7, "v5", "v6", "d")
	if snap := s.next(); describe(snap.Changes) != "added:d" {
		t.Fatalf("after an empty diff: got %q", describe(snap.Changes))
	}
}
