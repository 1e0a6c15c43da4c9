package entitysync_test

// Routing by key on NATS and Redis (RouteByKey), end to end: real brokers,
// real websockets, two servers.

import (
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

func TestRoutingNATS(t *testing.T)  { runRouting(t, natsBroker(t)) }
func TestRoutingRedis(t *testing.T) { runRouting(t, redisBroker(t)) }

// The restart scenario of convergence_queues_test.go with routing queues:
// every server resyncs and every client converges.
func TestConvergenceAcrossNATSRestartRouted(t *testing.T) {
	b := fullBurst
	b.restart = true
	qb := natsBroker(t)
	qb.newQueue = qb.newRouted
	runQueueBurst(t, b, qb)
}

func TestConvergenceAcrossRedisRestartRouted(t *testing.T) {
	b := fullBurst
	b.restart = true
	qb := redisBroker(t)
	qb.newQueue = qb.newRouted
	runQueueBurst(t, b, qb)
}

// A server receives the notifications of the keys its clients watch and no
// others, loss detection sees no false gap in what it does not hear, a key
// whose last subscriber left is no longer received, and a key subscribed
// while it keeps changing on another server ends at its latest version (the
// server listens for the key before it fetches it).
func runRouting(t *testing.T, qb queueBroker) {
	store := testkit.NewStore()
	var servers [2]*es.EntitySync
	watcher := make([]server, 2)
	for i := range servers {
		e, srv := testkit.Serve(t, es.Config{Queue: qb.newRouted(t), Logger: testkit.Logger()})
		if err := e.Register("items", store.Fetch); err != nil {
			t.Fatal(err)
		}
		servers[i] = e
		watcher[i] = server{e, srv}
	}
	a, b := servers[0], servers[1]
	progress := testkit.NewProgress()
	tr := testkit.DialTracker(t, watcher[0].srv, testkit.TrackerOptions{Progress: progress})
	if tr == nil {
		t.FailNow()
	}
	x := shared.EntityKey{Entity: "items", ID: "x"}
	if err := tr.Subscribe(x); err != nil {
		t.Fatal(err)
	}
	progress.Await(t, 20*time.Second, func() (bool, string) {
		_, ok := tr.Latest(x)
		return ok, "no initial state of x"
	})

	// 100 changes of keys nobody on server a watches, one batch, then x.
	for i := 0; i < 100; i++ {
		k := shared.EntityKey{Entity: "items", ID: "other-" + strconv.Itoa(i)}
		store.Bump(k)
		if err := b.NotifyAllOfChange(k); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.NotifyKeys(shared.EntityKey{Entity: "items", ID: "o1"}, shared.EntityKey{Entity: "items", ID: "o2"}); err != nil {
		t.Fatal(err)
	}
	v := store.Bump(x)
	if err := b.NotifyAllOfChange(x); err != nil {
		t.Fatal(err)
	}
	progress.Await(t, 20*time.Second, func() (bool, string) {
		got, _ := tr.Latest(x)
		return got >= v, fmt.Sprintf("x at version %d, want %d", got, v)
	})
	if st := a.Bridge.Stats(); st.Received != 1 || st.Resyncs != 0 {
		t.Errorf("server a received %d notifications and resynced %d times, want 1 (x's) and 0", st.Received, st.Resyncs)
	}

	// Once x's last subscriber left, x's changes no longer reach server a.
	// Subscribing to y after the unsubscribe, and waiting for its state,
	// makes sure server a has handled the unsubscribe; x's change is then
	// published before y's, on the same connection.
	if err := tr.Unsubscribe(x); err != nil {
		t.Fatal(err)
	}
	y := shared.EntityKey{Entity: "items", ID: "y"}
	if err := tr.Subscribe(y); err != nil {
		t.Fatal(err)
	}
	progress.Await(t, 20*time.Second, func() (bool, string) {
		_, ok := tr.Latest(y)
		return ok, "no initial state of y"
	})
	store.Bump(x)
	if err := b.NotifyAllOfChange(x); err != nil {
		t.Fatal(err)
	}
	vy := store.Bump(y)
	if err := b.NotifyAllOfChange(y); err != nil {
		t.Fatal(err)
	}
	progress.Await(t, 20*time.Second, func() (bool, string) {
		got, _ := tr.Latest(y)
		return got >= vy, fmt.Sprintf("y at version %d, want %d", got, vy)
	})
	if st := a.Bridge.Stats(); st.Received != 2 {
		t.Errorf("server a received %d notifications, want 2 (x's before the unsubscribe, y's): x's change after its last subscriber left arrived", st.Received)
	}

	// Subscribing while the key changes on the other server: the last
	// version always arrives.
	const keys, changes = 30, 5
	var wg sync.WaitGroup
	for i := 0; i < keys; i++ {
		k := shared.EntityKey{Entity: "items", ID: "race-" + strconv.Itoa(i)}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < changes; j++ {
				store.Bump(k)
				if err := b.NotifyAllOfChange(k); err != nil {
					t.Error(err)
					return
				}
			}
		}()
		if err := tr.Subscribe(k); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	progress.Await(t, 20*time.Second, func() (bool, string) {
		for i := 0; i < keys; i++ {
			k := shared.EntityKey{Entity: "items", ID: "race-" + strconv.Itoa(i)}
			if got, _ := tr.Latest(k); got != changes {
				return false, fmt.Sprintf("%s at version %d, want %d", k, got, changes)
			}
		}
		return true, ""
	})
	if st := a.Bridge.Stats(); st.Resyncs != 0 {
		t.Errorf("server a resynced %d times with no broker loss", st.Resyncs)
	}
}
