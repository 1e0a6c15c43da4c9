package esbridge_test

import (
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// collectionBridge serves "items" as a collection of store's lists, and
// reports each finished round on the returned channel.
func collectionBridge(t *testing.T) (*esbridge.Bridge, *testkit.Collection, chan esbridge.Round) {
	t.Helper()
	store := testkit.NewCollection()
	hub := esdb.NewDatabaseHub()
	if err := hub.RegisterCollection("items", store.Fetch, esdb.JSONField("id")); err != nil {
		t.Fatal(err)
	}
	rounds := make(chan esbridge.Round, 16)
	b := newUnitBridge(t, hub, esbridge.Options{OnRound: func(r esbridge.Round) { rounds <- r }})
	return b, store, rounds
}

// change notifies k1 and waits until its round has handed the new state
// over.
func change(t *testing.T, b *esbridge.Bridge, rounds chan esbridge.Round) {
	t.Helper()
	if err := b.NotifyAllOfChange(k1); err != nil {
		t.Fatal(err)
	}
	select {
	case <-rounds:
	case <-time.After(unitWait):
		t.Fatal("no round")
	}
}

func diffClient(b *esbridge.Bridge) *esbridge.Client {
	c := b.ClientBuilder(nil)
	c.AcceptDiffs()
	return c
}

// Latest-wins: a state replacing one that was never written is diffed from
// the state the connection got last, not from the replaced one.
func TestDiffStartsFromTheStateWritten(t *testing.T) {
	b, store, rounds := collectionBridge(t)
	store.Fill("1", 10, 20)
	c := diffClient(b)
	if err := c.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	<-rounds
	a := nextOne(t, c, k1) // written: the connection holds a
	if base, d := a.Diff(); d != nil || base != "" || len(a.IDs()) != 10 {
		t.Fatalf("first state: base %q, diff %v, ids %v; want the full state", base, d, a.IDs())
	}

	store.Set("1", "r1", "b")
	change(t, b, rounds) // pending, never taken
	store.Set("1", "r2", "c")
	change(t, b, rounds) // replaces it

	u := nextOne(t, c, k1)
	base, d := u.Diff()
	if base != a.Version() {
		t.Fatalf("diff from %s, want from the written state %s", base, a.Version())
	}
	if u.Version() != shared.Version(store.Rows("1")) || len(d.Upsert) != 2 {
		t.Fatalf("diff to %s with %d upserts, want to %s with both changed rows", u.Version(), len(d.Upsert), shared.Version(store.Rows("1")))
	}
}

// Every client at the same base is handed the same view of a change: the
// diff is computed and encoded once per server, not per client.
func TestDiffViewIsShared(t *testing.T) {
	b, store, rounds := collectionBridge(t)
	store.Fill("1", 10, 20)
	var clients []*esbridge.Client
	for i := 0; i < 3; i++ {
		c := diffClient(b)
		if err := c.Subscribe(k1); err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
	}
	<-rounds
	for _, c := range clients {
		nextOne(t, c, k1)
	}
	store.Set("1", "r4", "x")
	change(t, b, rounds)
	first := nextOne(t, clients[0], k1)
	if _, d := first.Diff(); d == nil {
		t.Fatal("no diff view")
	}
	for i, c := range clients[1:] {
		if u := nextOne(t, c, k1); u != first {
			t.Errorf("client %d got another view of the change", i+1)
		}
	}
	// A client that does not accept diffs gets the state itself.
	plain := b.ClientBuilder(nil)
	if err := plain.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	if u := nextOne(t, plain, k1); u.Full() != u {
		t.Error("a client without AcceptDiffs was handed a view")
	}
}

// A client resubscribing to a held key with the version of the state the
// bridge last handed it gets Unchanged.
func TestSubscribeFromTheCurrentVersion(t *testing.T) {
	b, store, rounds := collectionBridge(t)
	store.Fill("1", 5, 20)
	c := diffClient(b)
	if err := c.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	<-rounds
	a := nextOne(t, c, k1)
	if err := c.SubscribeFrom(k1, a.Version()); err != nil {
		t.Fatal(err)
	}
	if u := nextOne(t, c, k1); !u.Unchanged() || u.Seq <= a.Seq {
		t.Fatalf("got unchanged=%v seq %d, want unchanged above %d", u.Unchanged(), u.Seq, a.Seq)
	}
	// Without a version, the client says it holds nothing: full state.
	if err := c.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	if u := nextOne(t, c, k1); u.Unchanged() || u.Full() != u {
		t.Fatal("a subscribe without a version got a view")
	}
}
