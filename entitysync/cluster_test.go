package entitysync_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

const wait = 10 * time.Second

type server struct {
	es  *es.EntitySync
	srv *httptest.Server
}

// startServers starts n servers sharing store, each configured by cfg(i),
// serving the entity types "items" and "users".
func startServers(t *testing.T, n int, store *testkit.Store, cfg func(i int) es.Config) []server {
	t.Helper()
	out := make([]server, n)
	for i := range out {
		e, srv := testkit.Serve(t, cfg(i))
		for _, entity := range []shared.EntityType{"items", "users"} {
			if err := e.Register(entity, store.Fetch); err != nil {
				t.Fatalf("server %d: register %s: %v", i, entity, err)
			}
		}
		out[i] = server{e, srv}
	}
	return out
}

// checkBroadcast runs the cluster scenario: a change notified on server 0
// reaches the key's subscribers on every server, and nobody else.
func checkBroadcast(t *testing.T, servers []server, store *testkit.Store) {
	t.Helper()
	changed := shared.EntityKey{Entity: "items", ID: "1"}
	other := shared.EntityKey{Entity: "items", ID: "2"}
	fence := shared.EntityKey{Entity: "users", ID: "fence"}

	type trio struct{ sub, otherKey, none *testkit.WS }
	clients := make([]trio, len(servers))
	for i, s := range servers {
		c := trio{testkit.Dial(t, s.srv), testkit.Dial(t, s.srv), testkit.Dial(t, s.srv)}
		c.sub.Subscribe("items", "1")
		c.otherKey.Subscribe("items", "2")
		for _, ws := range []*testkit.WS{c.sub, c.otherKey, c.none} {
			ws.Subscribe("users", "fence")
		}
		c.sub.AwaitKeys(wait, changed, fence)
		c.otherKey.AwaitKeys(wait, other, fence)
		c.none.AwaitKeys(wait, fence)
		clients[i] = c
	}

	v := store.Bump(changed)
	if err := servers[0].es.NotifyAllOfChange(changed); err != nil {
		t.Fatal(err)
	}
	for i, c := range clients {
		before := c.sub.Await(wait, fmt.Sprintf("items/1 v%d on server %d", v, i), testkit.Is("items", "1", v))
		if len(before) != 0 {
			t.Errorf("server %d: subscriber got unexpected frames first: %v", i, before)
		}
	}
	// Every server has pushed items/1 to its subscriber, so any stray push to
	// the others is already in their queues, ahead of the fence.
	fv := store.Bump(fence)
	if err := servers[len(servers)-1].es.NotifyAllOfChange(fence); err != nil {
		t.Fatal(err)
	}
	for i, c := range clients {
		for _, ws := range []*testkit.WS{c.otherKey, c.none} {
			for _, r := range ws.Await(wait, "fence", testkit.Is("users", "fence", fv)) {
				t.Errorf("server %d: client not subscribed to items/1 got %s", i, r.Raw)
			}
		}
	}
	// One initial fetch per server, none for the change of items/1; a
	// server that discovers another nsqd meanwhile resyncs, which re-fetches.
	var resyncs uint64
	for _, s := range servers {
		resyncs += s.es.Bridge.Stats().Resyncs
	}
	if got := store.FetchesOf(other); got < int64(len(servers)) || got > int64(len(servers))+int64(resyncs) {
		t.Errorf("items/2 fetched %d times, want %d plus at most %d resyncs", got, len(servers), resyncs)
	}
}

func TestThreeServersOneNSQD(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	store := testkit.NewStore()
	servers := startServers(t, 3, store, func(int) es.Config { return es.Config{NSQAddr: nsqd.TCPAddr()} })
	checkBroadcast(t, servers, store)
}

func TestThreeServersTwoNSQDThroughLookupd(t *testing.T) {
	lookupd := nsqtest.StartLookupd(t)
	nsqds := []*nsqtest.NSQD{nsqtest.StartNSQD(t, lookupd.TCPAddr()), nsqtest.StartNSQD(t, lookupd.TCPAddr())}
	store := testkit.NewStore()
	servers := startServers(t, 3, store, func(i int) es.Config {
		return es.Config{
			NSQAddr:         nsqds[i%2].TCPAddr(), // each server publishes to "its host's" nsqd
			NSQLookupdAddrs: []string{lookupd.HTTPAddr()},
			NSQ:             esq.NSQConfig{ReconnectInterval: 200 * time.Millisecond},
		}
	})
	checkBroadcast(t, servers, store)
}

// A producer in any language triggers a push by publishing the key's JSON to
// the entity type's topic, here through nsqd's HTTP API as docs/queues.md shows.
func TestPublishFromOutsideGo(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	store := testkit.NewStore()
	servers := startServers(t, 1, store, func(int) es.Config { return es.Config{NSQAddr: nsqd.TCPAddr()} })
	ws := testkit.Dial(t, servers[0].srv)
	ws.Subscribe("items", "100")
	ws.AwaitKeys(wait, key("items", "100"))
	for _, body := range []string{`{"entity":"items","id":"100"}`, `{"id":"100"}`} {
		v := store.Bump(key("items", "100"))
		resp, err := http.Post("http://"+nsqd.HTTPAddr()+"/pub?topic=items", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("nsqd /pub answered %s", resp.Status)
		}
		ws.Await(wait, "push triggered by "+body, testkit.Is("items", "100", v))
	}
}
