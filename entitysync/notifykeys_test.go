package entitysync_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esq/pgq"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/pgtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// received returns how many queue messages each server's bridge received.
func received(servers []server) []uint64 {
	out := make([]uint64, len(servers))
	for i, s := range servers {
		out[i] = s.es.Bridge.Stats().Received
	}
	return out
}

// subscribeOnEach connects one client to each server, subscribed to keys,
// and waits for their initial states.
func subscribeOnEach(t *testing.T, servers []server, keys []shared.EntityKey) []*testkit.WS {
	t.Helper()
	var clients []*testkit.WS
	for _, s := range servers {
		ws := testkit.Dial(t, s.srv)
		for _, k := range keys {
			ws.Subscribe(string(k.Entity), k.ID)
		}
		ws.AwaitKeys(wait, keys...)
		clients = append(clients, ws)
	}
	return clients
}

// checkNotifyKeys changes keys of two entity types, notifies them in one
// NotifyKeys call on server 0 and checks that every server's subscribers
// get every new state, and that each server received one queue message per
// entity type.
func checkNotifyKeys(t *testing.T, servers []server, store *testkit.Store) {
	t.Helper()
	keys := []shared.EntityKey{key("items", "1"), key("items", "2"), key("users", "7")}
	clients := subscribeOnEach(t, servers, keys)
	before := received(servers)
	want := map[shared.EntityKey]int{}
	for _, k := range keys {
		want[k] = store.Bump(k)
	}
	// items/1 twice: still one id in the message.
	if err := servers[0].es.NotifyKeys(append(keys, keys[0])...); err != nil {
		t.Fatal(err)
	}
	for _, ws := range clients {
		ws.AwaitVersions(wait, want)
	}
	for i, n := range received(servers) {
		if got := n - before[i]; got != 2 {
			t.Errorf("server %d received %d queue messages for 3 keys of 2 entity types, want 2", i, got)
		}
	}
}

// One NotifyKeys call through a real nsqd (with loss detection, as by
// default): one message per entity type reaches every server.
func TestNotifyKeysThroughNSQD(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	store := testkit.NewStore()
	servers := startServers(t, 2, store, func(int) es.Config { return es.Config{NSQAddr: nsqd.TCPAddr(), Logger: testkit.SilentLogger()} })
	checkNotifyKeys(t, servers, store)

	// The multi-key form from a producer outside Go, through nsqd's HTTP
	// API, next to the single-key one.
	ws := testkit.Dial(t, servers[1].srv)
	ws.Subscribe("items", "1")
	ws.Subscribe("items", "2")
	ws.AwaitKeys(wait, key("items", "1"), key("items", "2"))
	v1, v2 := store.Bump(key("items", "1")), store.Bump(key("items", "2"))
	resp, err := http.Post("http://"+nsqd.HTTPAddr()+"/pub?topic=items", "application/json", strings.NewReader(`{"entity":"items","ids":["1","2"]}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	ws.AwaitVersions(wait, map[shared.EntityKey]int{key("items", "1"): v1, key("items", "2"): v2})
}

// The same through the in-process queue.
func TestNotifyKeysInProcess(t *testing.T) {
	store := testkit.NewStore()
	servers := startServers(t, 1, store, func(int) es.Config { return es.Config{Logger: testkit.SilentLogger()} })
	checkNotifyKeys(t, servers, store)
}

// Postgres refuses a NOTIFY payload of 8000 bytes or more: the keys of one
// NotifyKeys call are split into payloads that fit (with loss detection's
// stamp), and every key still reaches every server.
func TestNotifyKeysSplitForPostgres(t *testing.T) {
	t.Parallel()
	ch := pgtest.Name(t, "es_chan_")
	store := testkit.NewStore()
	servers := startServers(t, 2, store, func(int) es.Config {
		return es.Config{Queue: newPGQueue(t, ch), Logger: testkit.SilentLogger()}
	})
	// 60 keys of 200-byte ids: about 12 KB of ids.
	keys := make([]shared.EntityKey, 60)
	for i := range keys {
		keys[i] = key("items", fmt.Sprintf("%03d%s", i, strings.Repeat("x", 197)))
	}
	clients := subscribeOnEach(t, servers, keys)
	before := received(servers)
	want := map[shared.EntityKey]int{}
	for _, k := range keys {
		want[k] = store.Bump(k)
	}
	if err := servers[0].es.NotifyKeys(keys...); err != nil {
		t.Fatalf("NotifyKeys: %v (a payload over %d bytes?)", err, pgq.MaxPayload)
	}
	for _, ws := range clients {
		ws.AwaitVersions(wait, want)
	}
	// Every key's new state arrived, so every message was received.
	for i, n := range received(servers) {
		if got := n - before[i]; got != 2 {
			t.Errorf("server %d received %d messages for %d keys of ~12 KB, want 2", i, got, len(keys))
		}
	}
}
