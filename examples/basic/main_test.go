package main

import (
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// frameWait bounds every wait for a frame; the demo changes item 100 every
// tick (50ms here), so this is generous even under -race on a busy machine.
const frameWait = 10 * time.Second

const tick = 50 * time.Millisecond

// TestDemoPushesChanges is the demo's smoke test on the in-process queue: a
// real websocket client subscribes to items/100, gets its current state, then
// a later state, and is told goodbye (1001) when the demo shuts down.
func TestDemoPushesChanges(t *testing.T) {
	d := startDemo(t, config{Every: tick})
	ws := subscribe(t, d.addr, "100")

	first := nextItem(t, ws)
	if first.ID != "100" {
		t.Fatalf("first frame is item %q, want 100", first.ID)
	}
	awaitNewer(t, ws, first)

	// Read the goodbye while run shuts down: the server waits for the
	// client's close reply, so reading it first keeps shutdown fast.
	d.cancel()
	expectGoingAway(t, ws)
	d.wait(t)
}

// TestDemoAcrossServersOverNSQ runs two demo instances on one real nsqd
// (embedded in the test) sharing one item file (-store), as two servers share
// a database. Only instance A changes item 100; a client of instance B still
// sees the changes, so the notification went A -> nsqd -> B.
func TestDemoAcrossServersOverNSQ(t *testing.T) {
	if testing.Short() {
		t.Skip("starts an nsqd")
	}
	nsqd := nsqtest.StartNSQD(t)
	path := filepath.Join(t.TempDir(), "items.json")
	startDemo(t, config{NSQDAddrs: []string{nsqd.TCPAddr()}, Every: tick, Items: openStore(t, path)})
	b := startDemo(t, config{NSQDAddrs: []string{nsqd.TCPAddr()}, Every: 0, Items: openStore(t, path)})

	ws := subscribe(t, b.addr, "100")
	awaitNewer(t, ws, nextItem(t, ws))
}

// TestUnknownItemIsEmpty checks that subscribing to an id the store lacks
// pushes nothing and does not disturb a subscription that has data.
func TestUnknownItemIsEmpty(t *testing.T) {
	d := startDemo(t, config{Every: tick})
	ws := subscribe(t, d.addr, "nope")
	if err := ws.WriteJSON(subscribeMsg("100")); err != nil {
		t.Fatal(err)
	}
	// Every frame on this connection must be item 100: "nope" has no rows.
	for range 3 {
		if it := nextItem(t, ws); it.ID != "100" {
			t.Fatalf("got item %q, want only 100", it.ID)
		}
	}
}

// TestFileStoreIsShared checks that two stores on one file see each other's
// writes, which is what makes the cluster demo show the same item everywhere.
func TestFileStoreIsShared(t *testing.T) {
	path := filepath.Join(t.TempDir(), "items.json")
	a, b := openStore(t, path), openStore(t, path)
	if _, err := a.bump(demoItemID); err != nil {
		t.Fatal(err)
	}
	it, ok, err := b.get(demoItemID)
	if err != nil || !ok || it.Counter != 1 {
		t.Fatalf("b.get = %+v, %v, %v; want counter 1", it, ok, err)
	}
}

func openStore(t *testing.T, path string) *itemStore {
	t.Helper()
	s, err := openItemStore(path)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestAddrListFlag(t *testing.T) {
	var a addrList
	for _, v := range []string{"a:4150", " b:4150 , c:4150,", ""} {
		if err := a.Set(v); err != nil {
			t.Fatalf("Set(%q): %v", v, err)
		}
	}
	if want := []string{"a:4150", "b:4150", "c:4150"}; !slices.Equal(a, want) {
		t.Fatalf("got %q, want %q", a, want)
	}
	if err := a.Set("no-port"); err == nil {
		t.Fatal("Set accepted an address without a port")
	}
}

// demo is one running instance of the demo server.
type demo struct {
	addr   string
	cancel context.CancelFunc // starts run's graceful shutdown
	wait   func(t *testing.T) // waits for run and checks it returned nil
}

// startDemo runs the demo on a random loopback port until the test ends (or
// cancel is called).
func startDemo(t *testing.T, cfg config) demo {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Log == nil {
		cfg.Log = testkit.Logger()
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg, ln) }()

	var once sync.Once
	wait := func(t *testing.T) {
		t.Helper()
		once.Do(func() {
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("run returned %v, want a clean shutdown", err)
				}
			case <-time.After(shutdownTimeout + 5*time.Second):
				t.Errorf("run did not return after its context ended")
			}
		})
	}
	t.Cleanup(func() { cancel(); wait(t) })
	return demo{addr: ln.Addr().String(), cancel: cancel, wait: wait}
}

func subscribeMsg(id string) map[string]any {
	return map[string]any{"action": "subscribe", "body": map[string]string{"entity": string(entityItems), "id": id}}
}

// subscribe opens a websocket to the demo and subscribes to items/id.
func subscribe(t *testing.T, addr, id string) *websocket.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), frameWait)
	defer cancel()
	ws, _, err := websocket.DefaultDialer.DialContext(ctx, "ws://"+addr+shared.WebsocketPath, nil)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { ws.Close() })
	if err := ws.WriteJSON(subscribeMsg(id)); err != nil {
		t.Fatalf("subscribe: %v", err)
	}
	return ws
}

// nextItem reads one text frame, which must be one item row.
func nextItem(t *testing.T, ws *websocket.Conn) item {
	t.Helper()
	ws.SetReadDeadline(time.Now().Add(frameWait))
	kind, data, err := ws.ReadMessage()
	if err != nil {
		t.Fatalf("waiting for a frame: %v", err)
	}
	if kind != websocket.TextMessage {
		t.Fatalf("got frame type %d, want text", kind)
	}
	var it item
	if err := json.Unmarshal(data, &it); err != nil {
		t.Fatalf("frame %q is not an item row: %v", data, err)
	}
	return it
}

// awaitNewer reads frames until one shows item 100 changed since prev. The
// counter must never go back: pushes for one key arrive in order.
func awaitNewer(t *testing.T, ws *websocket.Conn, prev item) item {
	t.Helper()
	deadline := time.Now().Add(frameWait)
	for time.Now().Before(deadline) {
		it := nextItem(t, ws)
		switch {
		case it.Counter < prev.Counter:
			t.Fatalf("counter went back from %d to %d", prev.Counter, it.Counter)
		case it.Counter > prev.Counter:
			return it
		}
	}
	t.Fatalf("item 100 did not change from counter %d within %s", prev.Counter, frameWait)
	return item{}
}

// expectGoingAway reads past any last updates until the server's close frame,
// which must say 1001 (going away).
func expectGoingAway(t *testing.T, ws *websocket.Conn) {
	t.Helper()
	ws.SetReadDeadline(time.Now().Add(frameWait))
	for {
		_, _, err := ws.ReadMessage()
		if err == nil {
			continue
		}
		if !websocket.IsCloseError(err, websocket.CloseGoingAway) {
			t.Fatalf("after shutdown got %v, want close frame 1001", err)
		}
		return
	}
}
