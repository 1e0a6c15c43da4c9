package entitysync_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

func key(entity, id string) shared.EntityKey {
	return shared.EntityKey{Entity: shared.EntityType(entity), ID: id}
}

func TestSeveralKeysAndEntityTypesPerClient(t *testing.T) {
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, es.Config{})
	for _, entity := range []shared.EntityType{"items", "users"} {
		if err := e.Register(entity, store.Fetch); err != nil {
			t.Fatal(err)
		}
	}
	ws := testkit.Dial(t, srv)
	keys := []shared.EntityKey{key("items", "1"), key("items", "2"), key("users", "1")}
	for _, k := range keys {
		ws.Subscribe(string(k.Entity), k.ID)
	}
	ws.AwaitKeys(wait, keys...)
	for _, k := range keys {
		v := store.Bump(k)
		if err := e.NotifyAllOfChange(k); err != nil {
			t.Fatal(err)
		}
		ws.Await(wait, k.String(), testkit.Is(string(k.Entity), k.ID, v))
	}
}

func TestSeveralRowsOneFramePerRow(t *testing.T) {
	store := testkit.NewStore()
	store.Parts = 3
	e, srv := testkit.Serve(t, es.Config{})
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	ws := testkit.Dial(t, srv)
	ws.Subscribe("items", "1")
	for part := 0; part < 3; part++ {
		b, ok := ws.Next(wait)
		if !ok {
			t.Fatalf("row %d not received", part)
		}
		if r := testkit.ParseRow(b); r.Part != part || r.ID != "1" {
			t.Fatalf("frame %d is %s, want part %d of items/1", part, b, part)
		}
	}
}

func TestSecretReachesSeedHandler(t *testing.T) {
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, es.Config{})
	if err := e.RegisterEntityAndDBHandler("items", store.SeedHandler); err != nil {
		t.Fatal(err)
	}
	alice, bob := testkit.Dial(t, srv), testkit.Dial(t, srv)
	alice.SetSecret("alice-secret")
	bob.SetSecret("bob-secret")
	alice.Subscribe("items", "1")
	bob.Subscribe("items", "1")
	isFor := func(secret string) func(testkit.Row) bool {
		return func(r testkit.Row) bool { return r.ID == "1" && r.Secret == secret }
	}
	alice.Await(wait, "alice's rows", isFor("alice-secret"))
	bob.Await(wait, "bob's rows", isFor("bob-secret"))

	// A new secret re-runs the handler for the connection's keys.
	bob.SetSecret("bob-new")
	bob.Await(wait, "bob's rows under the new secret", isFor("bob-new"))
}

func TestUnsubscribeStopsPushes(t *testing.T) {
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, es.Config{})
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	stays, leaves := testkit.Dial(t, srv), testkit.Dial(t, srv)
	k, fence := key("items", "1"), key("items", "fence")
	for _, ws := range []*testkit.WS{stays, leaves} {
		ws.Subscribe("items", "1")
		ws.Subscribe("items", "fence")
		ws.AwaitKeys(wait, k, fence)
	}
	leaves.Unsubscribe("items", "1")
	// The unsubscribe is processed before the fence subscription that
	// follows it on the same connection; the fence's initial state proves it.
	leaves.Subscribe("items", "fence")
	leaves.Await(wait, "fence re-subscribe", testkit.Is("items", "fence", 0))

	v := store.Bump(k)
	if err := e.NotifyAllOfChange(k); err != nil {
		t.Fatal(err)
	}
	stays.Await(wait, "change", testkit.Is("items", "1", v))
	fv := store.Bump(fence)
	if err := e.NotifyAllOfChange(fence); err != nil {
		t.Fatal(err)
	}
	for _, r := range leaves.Await(wait, "fence", testkit.Is("items", "fence", fv)) {
		t.Errorf("unsubscribed client got %s", r.Raw)
	}
}

func TestEntityNameNSQRejects(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	e, _ := testkit.Serve(t, es.Config{NSQAddr: nsqd.TCPAddr()})
	store := testkit.NewStore()
	for _, bad := range []shared.EntityType{"has space", "slash/y", shared.EntityType(strings.Repeat("x", 65)), "ünïcode"} {
		err := e.Register(bad, store.Fetch)
		if err == nil || !strings.Contains(err.Error(), "not valid") {
			t.Errorf("Register(%q) = %v, want an invalid topic error", bad, err)
		}
		if err := e.NotifyAllOfChange(shared.EntityKey{Entity: bad, ID: "1"}); err == nil {
			t.Errorf("NotifyAllOfChange(%q) succeeded", bad)
		}
	}
	// A rejected name can be fixed and registered again.
	if err := e.Register("fine.name_1-2", store.Fetch); err != nil {
		t.Fatal(err)
	}
	if err := e.NotifyAllOfChange(shared.EntityKey{ID: "1"}); err == nil {
		t.Error("NotifyAllOfChange with an empty entity succeeded")
	}
}

func TestSetupReportsErrorsWithoutExiting(t *testing.T) {
	// NSQ lookupd without any nsqd to publish to is not a usable setup.
	e := es.Setup(es.Config{NSQLookupdAddrs: []string{"127.0.0.1:1"}})
	if e.Err() == nil {
		t.Fatal("Setup accepted a configuration with nowhere to publish")
	}
	if err := e.RegisterEntityAndDBHandler("items", func(shared.EntityKey, string, shared.ByteHandler) {}); err == nil {
		t.Error("Register on a failed setup succeeded")
	}
	if err := e.NotifyAllOfChange(key("items", "1")); err == nil {
		t.Error("Notify on a failed setup succeeded")
	}
	// The seed calls the bridge directly.
	if err := e.Bridge.NotifyAllOfChange(key("items", "1")); err == nil {
		t.Error("Bridge.NotifyAllOfChange on a failed setup succeeded")
	}
	if err := e.Close(context.Background()); err != nil {
		t.Errorf("Close on a failed setup: %v", err)
	}
}

func TestCloseSays1001AndLeavesNoGoroutine(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	before := len(testkit.Goroutines())

	store := testkit.NewStore()
	e, err := es.New(es.Config{NSQAddr: nsqd.TCPAddr()})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	srv := newHTTPServer(t, e)
	var conns []*websocket.Conn
	for i := 0; i < 5; i++ {
		ws := testkit.Dial(t, srv)
		ws.Subscribe("items", "1")
		ws.AwaitKeys(wait, key("items", "1"))
		conns = append(conns, ws.Conn)
		defer func(ws *testkit.WS) {
			<-ws.Closed
			var ce *websocket.CloseError
			if !errors.As(ws.CloseErr, &ce) || ce.Code != websocket.CloseGoingAway {
				t.Errorf("client closed with %v, want close code 1001", ws.CloseErr)
			}
		}(ws)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.NotifyAllOfChange(key("items", "1")); err == nil {
		t.Error("Notify after Close succeeded")
	}
	srv.Close()
	for _, c := range conns {
		c.Close()
	}
	testkit.AwaitGoroutines(t, before, 10*time.Second)
}
