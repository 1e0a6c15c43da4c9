package esbridge_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

// routingQueue is the in-process queue plus the esq.Interest calls, which it
// counts per key. Its Watch waits for release, when set, so a test can hold
// a key between "listening requested" and "listening confirmed".
type routingQueue struct {
	*esq.Memory
	release chan struct{}
	started chan shared.EntityKey // a token per Watch call, if not nil

	mu      sync.Mutex
	count   map[shared.EntityKey]int
	calls   int
	changed chan struct{}
}

func newRoutingQueue() *routingQueue {
	return &routingQueue{Memory: esq.NewMemory(), count: make(map[shared.EntityKey]int), changed: make(chan struct{}, 1)}
}

func (q *routingQueue) Routes() bool { return true }

func (q *routingQueue) Watch(key shared.EntityKey) error {
	if q.started != nil {
		q.started <- key
	}
	if q.release != nil {
		<-q.release
	}
	q.add(key, 1)
	return nil
}

func (q *routingQueue) Unwatch(key shared.EntityKey) { q.add(key, -1) }

func (q *routingQueue) add(key shared.EntityKey, d int) {
	q.mu.Lock()
	q.count[key] += d
	q.calls++
	q.mu.Unlock()
	select {
	case q.changed <- struct{}{}:
	default:
	}
}

func (q *routingQueue) watches(key shared.EntityKey) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.count[key]
}

// await waits until key's watch count is want.
func (q *routingQueue) await(t *testing.T, key shared.EntityKey, want int) {
	t.Helper()
	deadline := time.After(unitWait)
	for q.watches(key) != want {
		select {
		case <-q.changed:
		case <-deadline:
			t.Fatalf("%s watched %d times, want %d", key, q.watches(key), want)
		}
	}
}

func routedBridge(t *testing.T, q esq.Queue, f esbridge.Fetcher) *esbridge.Bridge {
	t.Helper()
	b := esbridge.New(q, f, esbridge.Options{Logger: quietLogger()})
	if err := b.ServeEntity("items"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), unitWait)
		defer cancel()
		if err := b.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return b
}

// A key's first subscriber makes the bridge watch it, and no fetch of the
// key runs before the watch is confirmed, not even for a second client
// subscribing meanwhile: a change made between a fetch and the broker
// having the interest would otherwise reach nobody here.
func TestRoutingQueueIsWatchedBeforeTheFirstFetch(t *testing.T) {
	q := newRoutingQueue()
	q.release = make(chan struct{})
	q.started = make(chan shared.EntityKey, 4)
	f := newVersions()
	f.bump(k1)
	b := routedBridge(t, q, f)
	c1, c2 := b.ClientBuilder(nil), b.ClientBuilder(nil)
	done := make(chan error, 1)
	go func() { done <- c1.Subscribe(k1) }()
	select {
	case k := <-q.started:
		if k != k1 {
			t.Fatalf("watched %s, want %s", k, k1)
		}
	case <-time.After(unitWait):
		t.Fatal("the first subscribe did not watch the key")
	}
	if err := c2.Subscribe(k1); err != nil { // joins the key; must not fetch either
		t.Fatal(err)
	}
	if n := f.fetches.Load(); n != 0 {
		t.Fatalf("%d fetches before the watch was confirmed, want 0", n)
	}
	if got := c2.Take(nil); len(got) != 0 {
		t.Fatalf("second subscriber got %v before the first fetch", got)
	}
	close(q.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if row(nextOne(t, c1, k1)) != ":1" || row(nextOne(t, c2, k1)) != ":1" {
		t.Fatal("wrong first state")
	}
	if n := f.fetches.Load(); n != 1 {
		t.Errorf("%d fetches, want 1", n)
	}
	if n := q.watches(k1); n != 1 {
		t.Errorf("key watched %d times, want 1 (one per key, not per subscriber)", n)
	}
}

// The last subscriber leaving unwatches the key; a new one watches it again.
func TestRoutingQueueIsUnwatchedAfterTheLastSubscriber(t *testing.T) {
	q := newRoutingQueue()
	f := newVersions()
	b := routedBridge(t, q, f)
	c1, c2 := b.ClientBuilder(nil), b.ClientBuilder(nil)
	for _, c := range []*esbridge.Client{c1, c2} {
		if err := c.Subscribe(k1); err != nil {
			t.Fatal(err)
		}
		nextOne(t, c, k1)
	}
	q.await(t, k1, 1)
	c1.Unsubscribe(k1)
	if n := q.watches(k1); n != 1 {
		t.Fatalf("watched %d times with one subscriber left, want 1", n)
	}
	c2.Close()
	q.await(t, k1, 0)
	c3 := b.ClientBuilder(nil)
	if err := c3.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	nextOne(t, c3, k1)
	q.await(t, k1, 1)
}

// Under concurrent subscribes and unsubscribes of the same keys, every
// Watch is matched by one Unwatch: at rest a key is watched once while it
// has subscribers, and not at all once it has none.
func TestRoutingQueueWatchesBalanceUnderChurn(t *testing.T) {
	q := newRoutingQueue()
	f := newVersions()
	b := routedBridge(t, q, f)
	keys := []shared.EntityKey{k1, {Entity: "items", ID: "2"}, {Entity: "items", ID: "3"}}
	var wg sync.WaitGroup
	var failed atomic.Bool
	clients := make([]*esbridge.Client, 8)
	for i := range clients {
		clients[i] = b.ClientBuilder(nil)
		wg.Add(1)
		go func(c *esbridge.Client, i int) {
			defer wg.Done()
			for j := 0; j < 300; j++ {
				k := keys[(i+j)%len(keys)]
				if err := c.Subscribe(k); err != nil {
					failed.Store(true)
					return
				}
				if j%3 != 0 {
					c.Unsubscribe(k)
				}
				c.Take(nil)
			}
		}(clients[i], i)
	}
	wg.Wait()
	if failed.Load() {
		t.Fatal("a subscribe failed")
	}
	for _, k := range keys {
		held := false
		for _, c := range clients {
			held = held || c.Subscribed(k)
		}
		want := 0
		if held {
			want = 1
		}
		q.await(t, k, want)
	}
	for _, c := range clients {
		c.Close()
	}
	for _, k := range keys {
		q.await(t, k, 0)
	}
	q.mu.Lock()
	calls := q.calls
	q.mu.Unlock()
	if calls == 0 {
		t.Fatal("no Watch calls")
	}
}

// A key's Watch (a broker round trip) holds nothing of the subscribing
// client: while it waits, the same client subscribes to another key (whose
// Watch starts at once, alongside), changes its secret and unsubscribes,
// and each key still gets its first state only once its Watch returned.
func TestRoutingQueueWatchDoesNotHoldTheClient(t *testing.T) {
	q := newRoutingQueue()
	q.release = make(chan struct{})
	q.started = make(chan shared.EntityKey, 4)
	f := newVersions()
	b := routedBridge(t, q, f)
	c := b.ClientBuilder(nil)
	k2 := shared.EntityKey{Entity: "items", ID: "2"}
	k3 := shared.EntityKey{Entity: "items", ID: "3"}
	released := false
	defer func() {
		if !released {
			close(q.release) // let the blocked calls end so the bridge closes
		}
	}()
	done := make(chan error, 1)
	go func() {
		for _, k := range []shared.EntityKey{k1, k2, k3} {
			if err := c.Subscribe(k); err != nil {
				done <- err
				return
			}
		}
		c.SetSecret("s")
		c.Unsubscribe(k3)
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(unitWait):
		t.Fatal("the client's requests waited for a Watch")
	}
	watching := map[shared.EntityKey]bool{}
	for len(watching) < 3 {
		select {
		case k := <-q.started:
			watching[k] = true
		case <-time.After(unitWait):
			t.Fatalf("Watch started for %v only, want all three keys at once", watching)
		}
	}
	if n := f.fetches.Load(); n != 0 {
		t.Fatalf("%d fetches before the watches returned, want 0", n)
	}
	close(q.release)
	released = true
	got := map[shared.EntityKey]bool{}
	for len(got) < 2 {
		for _, u := range next(t, c) {
			got[u.Key] = true
		}
	}
	if !got[k1] || !got[k2] || got[k3] {
		t.Fatalf("first states of %v, want %s and %s", got, k1, k2)
	}
	q.await(t, k3, 0) // unsubscribed while its Watch ran: unwatched after it
	q.await(t, k1, 1)
}
