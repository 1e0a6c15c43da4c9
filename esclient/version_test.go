package esclient_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esclient"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// A state's version is a hash of its rows (shared.Version), computed by the
// server over the rows as fetched. Rows as databases write them (spaces
// after colons, <, >, &, U+2028) reach the client byte for byte, in full
// states and in diffs, so the rows a client holds hash to the version the
// server sent with them: a client can check what it holds.
func TestRowsHashToTheirVersion(t *testing.T) {
	var (
		mu   sync.Mutex
		rows = [][]byte{
			[]byte(`{"id":"a", "n": 2}`),
			[]byte(`{"id":"b","s":"<&>"}`),
			[]byte(`{"id":"c","u":"` + "\u2028" + `"}`),
		}
	)
	for i := range 20 { // so that a change of one row is sent as a diff
		rows = append(rows, fmt.Appendf(nil, `{"id": "p%d", "pad": "text that makes the full state bigger"}`, i))
	}
	fetch := func(context.Context, shared.EntityKey) ([][]byte, error) {
		mu.Lock()
		defer mu.Unlock()
		return rows, nil
	}
	e, srv := testkit.Serve(t, entitysync.Config{Logger: testkit.SilentLogger()})
	if err := e.Register("items", fetch); err != nil {
		t.Fatal(err)
	}
	if err := e.RegisterCollection("lists", fetch, esdb.JSONField("id")); err != nil {
		t.Fatal(err)
	}
	c := dial(t, wsURL(srv.URL), fast(esclient.Options{}))
	check := func(what string, snap esclient.Snapshot, want [][]byte) {
		t.Helper()
		got := make([][]byte, len(snap.Rows))
		for i, r := range snap.Rows {
			got[i] = r
		}
		if !sameRows(snap.Rows, want) {
			t.Errorf("%s: got rows %s, want %s", what, got, want)
		}
		if v := shared.Version(got); v != snap.Version {
			t.Errorf("%s: the rows received hash to %s, the server sent version %s", what, v, snap.Version)
		}
	}
	items, lists := newSnapshots(t), newSnapshots(t)
	if _, err := c.SubscribeWith(key("items", "1"), items.handlers()); err != nil {
		t.Fatal(err)
	}
	if _, err := c.SubscribeWith(key("lists", "1"), lists.handlers()); err != nil {
		t.Fatal(err)
	}
	check("items: rows", items.next(), rows)
	check("lists: rows", lists.next(), rows)

	mu.Lock()
	rows = slices.Clone(rows)
	rows[1] = []byte(`{"id":"b", "s": "<&> & more"}`)
	mu.Unlock()
	for _, k := range []shared.EntityKey{key("items", "1"), key("lists", "1")} {
		if err := e.NotifyAllOfChange(k); err != nil {
			t.Fatal(err)
		}
	}
	check("items: changed", items.next(), rows)
	snap := lists.next()
	if len(snap.Changes) != 1 || snap.Changes[0].Type != esclient.Modified || string(snap.Changes[0].Row) != string(rows[1]) {
		t.Errorf("lists: changes %s, want b modified", describe(snap.Changes))
	}
	check("lists: changed (a diff)", snap, rows)
}
