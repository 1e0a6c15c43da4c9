package esbridge_test

// What a change costs: one fetch per server per change whatever the number
// of subscribers, fewer under a burst (coalescing), none for a key nobody
// here subscribes to, and no client traffic for a notification that changes
// nothing. Real websockets; a real nsqd where the queue matters.

import (
	"context"
	"errors"
	"fmt"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

const fcWait = 20 * time.Second

var hot = shared.EntityKey{Entity: "items", ID: "hot"}

// fcServer starts an EntitySync serving "items" with fetch.
func fcServer(t *testing.T, cfg es.Config, fetch esdb.FetchFunc) (*es.EntitySync, *httptest.Server) {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = testkit.Logger()
	}
	e, srv := testkit.Serve(t, cfg)
	if err := e.Register("items", fetch); err != nil {
		t.Fatalf("register: %v", err)
	}
	return e, srv
}

// subscribeAll dials n trackers and subscribes each to keys, one after the
// other, waiting for each one's initial state before the next subscribes:
// every subscription then finds no fetch round running, so none is left
// running once the last initial state has arrived and the counters are at
// rest.
func subscribeAll(t *testing.T, srv *httptest.Server, progress *testkit.Progress, n int, keys ...shared.EntityKey) []*testkit.Tracker {
	t.Helper()
	trs := make([]*testkit.Tracker, n)
	for i := range trs {
		tr := testkit.DialTracker(t, srv, testkit.TrackerOptions{Progress: progress})
		if tr == nil {
			t.FailNow()
		}
		for _, k := range keys {
			if err := tr.Subscribe(k); err != nil {
				t.Fatalf("subscriber %d: %v", i, err)
			}
		}
		progress.Await(t, fcWait, func() (bool, string) {
			for _, k := range keys {
				if _, ok := tr.Latest(k); !ok {
					return false, fmt.Sprintf("subscriber %d: no initial state of %s", i, k)
				}
			}
			return true, ""
		})
		trs[i] = tr
	}
	return trs
}

// awaitVersion waits until every tracker holds key at version v or later.
func awaitVersion(t *testing.T, progress *testkit.Progress, trs []*testkit.Tracker, k shared.EntityKey, v int) {
	t.Helper()
	next := 0 // versions only grow: trackers once done stay done
	progress.Await(t, fcWait, func() (bool, string) {
		for ; next < len(trs); next++ {
			if got, ok := trs[next].Latest(k); !ok || got < v {
				if err := trs[next].CloseErr(); err != nil {
					t.Fatalf("subscriber %d lost its connection: %v", next, err)
				}
				return false, fmt.Sprintf("subscriber %d has %s at v%d, want v%d", next, k, got, v)
			}
		}
		return true, ""
	})
}

// awaitDeliveries waits until the bridge has counted want deliveries in all
// (it counts a round's deliveries after handing them over, so a client can
// hold an update before the counter shows it) and fails if it counted more.
func awaitDeliveries(t *testing.T, e *es.EntitySync, want uint64) {
	t.Helper()
	testkit.AwaitCond(t, fcWait, func() (bool, string) {
		got := e.Bridge.Stats().Deliveries
		return got >= want, fmt.Sprintf("%d deliveries, want %d", got, want)
	})
	if got := e.Bridge.Stats().Deliveries; got != want {
		t.Errorf("%d deliveries in all, want %d: an update was handed to a client twice, or to one that has it", got, want)
	}
}

func checkNoBackwards(t *testing.T, trs []*testkit.Tracker) {
	t.Helper()
	for i, tr := range trs {
		if bw := tr.Backwards(); len(bw) > 0 {
			t.Errorf("subscriber %d: per-key order broken: %v", i, bw)
		}
		if f := tr.Foreign(); len(f) > 0 {
			t.Errorf("subscriber %d: frames that are not rows: %v", i, f)
		}
	}
}

func TestOneFetchPerChangeWhateverTheSubscribers(t *testing.T) {
	for _, n := range []int{1, 100, 1000} {
		t.Run(fmt.Sprintf("%d subscribers", n), func(t *testing.T) {
			nsqd := nsqtest.StartNSQD(t)
			store := testkit.NewStore()
			e, srv := fcServer(t, es.Config{NSQAddr: nsqd.TCPAddr()}, store.Fetch)
			progress := testkit.NewProgress()
			start := time.Now()
			trs := subscribeAll(t, srv, progress, n, hot)
			t.Logf("%d subscribers with their initial state in %s (%d fetches)", n, time.Since(start).Round(time.Millisecond), store.FetchesOf(hot))

			// One change: exactly one fetch, one frame to each subscriber.
			// One update per subscriber so far.
			awaitDeliveries(t, e, uint64(n))
			base := store.FetchesOf(hot)
			v := store.Bump(hot)
			t0 := time.Now()
			if err := e.NotifyAllOfChange(hot); err != nil {
				t.Fatal(err)
			}
			awaitVersion(t, progress, trs, hot, v)
			took := time.Since(t0)
			if got := store.FetchesOf(hot) - base; got != 1 {
				t.Errorf("one change to a key with %d subscribers cost %d fetches, want 1", n, got)
			}
			awaitDeliveries(t, e, uint64(2*n))
			for i, tr := range trs {
				if f := tr.Frames(hot); f != 2 {
					t.Errorf("subscriber %d got %d frames for the initial state and one change, want 2", i, f)
				}
			}
			t.Logf("one change reached all %d subscribers in %s", n, took.Round(time.Millisecond))

			// A burst of notifications, back to back: at most one fetch
			// each, at least one, and everyone ends on the last version.
			const burst = 50
			base = store.FetchesOf(hot)
			for i := 0; i < burst; i++ {
				v = store.Bump(hot)
				if err := e.NotifyAllOfChange(hot); err != nil {
					t.Fatal(err)
				}
			}
			t0 = time.Now()
			awaitVersion(t, progress, trs, hot, v)
			took = time.Since(t0)
			got := store.FetchesOf(hot) - base
			if got < 1 || got > burst {
				t.Errorf("a burst of %d changes cost %d fetches, want 1..%d", burst, got, burst)
			}
			checkNoBackwards(t, trs)
			frames := 0
			for _, tr := range trs {
				frames += tr.Frames(hot) - 2
			}
			t.Logf("burst of %d changes: %d fetches, %d frames to %d subscribers (%.1f each), all on v%d %s after the last notify",
				burst, got, frames, n, float64(frames)/float64(n), v, took.Round(time.Millisecond))
		})
	}
}

func TestDuplicateNotificationsSendNothing(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	store := testkit.NewStore()
	e, srv := fcServer(t, es.Config{NSQAddr: nsqd.TCPAddr()}, store.Fetch)
	progress := testkit.NewProgress()
	trs := subscribeAll(t, srv, progress, 10, hot)
	v := store.Bump(hot)
	if err := e.NotifyAllOfChange(hot); err != nil {
		t.Fatal(err)
	}
	awaitVersion(t, progress, trs, hot, v)
	awaitDeliveries(t, e, uint64(2*len(trs))) // initial states and v

	st0, fetches0 := e.Bridge.Stats(), store.FetchesOf(hot)
	for i := 0; i < 3; i++ { // the same state, notified again
		if err := e.NotifyAllOfChange(hot); err != nil {
			t.Fatal(err)
		}
	}
	// The fence is the key's own next change. Notifications reach the bridge
	// in publish order and one key's fetch rounds run one at a time, so the
	// fence's round runs after every round the duplicates caused (or absorbs
	// them): once every client has the fence's version, whatever the
	// duplicates were going to send has been handed over. Deliveries also
	// counts an update that a newer one replaced in a client's queue before
	// it was written, which frames alone could not show.
	fv := store.Bump(hot)
	if err := e.NotifyAllOfChange(hot); err != nil {
		t.Fatal(err)
	}
	awaitVersion(t, progress, trs, hot, fv)
	// A duplicate's round that fetched after the fence's Bump may have
	// delivered the fence's version before the fence's own notification
	// arrived; that round, and any later one, finds the rows clients have.
	// Wait for all four so the counts below are final.
	testkit.AwaitCond(t, fcWait, func() (bool, string) {
		n := e.Bridge.Stats().Received - st0.Received
		return n >= 4, fmt.Sprintf("bridge received %d of 4 notifications", n)
	})
	// The change only: one more update per subscriber, none for the
	// duplicates.
	awaitDeliveries(t, e, uint64(3*len(trs)))
	st1 := e.Bridge.Stats()
	for i, tr := range trs {
		// Initial state, v, fence: three frames.
		if f := tr.Frames(hot); f != 3 {
			t.Errorf("subscriber %d got %d frames, want 3 (initial, v%d, v%d): duplicates were sent", i, f, v, fv)
		}
	}
	checkNoBackwards(t, trs)
	t.Logf("3 duplicates + 1 change: %d fetches, %d deliveries", store.FetchesOf(hot)-fetches0, st1.Deliveries-st0.Deliveries)
}

func TestChangeWithoutLocalSubscriberCostsNoFetch(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	store := testkit.NewStore()
	cfg := es.Config{NSQAddr: nsqd.TCPAddr()}
	a, srvA := fcServer(t, cfg, store.Fetch)
	b, srvB := fcServer(t, cfg, store.Fetch)
	elsewhere := shared.EntityKey{Entity: "items", ID: "only-on-a"}
	fence := shared.EntityKey{Entity: "items", ID: "fence"}
	nobody := shared.EntityKey{Entity: "items", ID: "nobody"}

	progress := testkit.NewProgress()
	onA := subscribeAll(t, srvA, progress, 1, elsewhere, fence)
	onB := subscribeAll(t, srvB, progress, 1, fence)
	stA, stB := a.Bridge.Stats(), b.Bridge.Stats()
	base := store.FetchesOf(elsewhere)

	// Server B has no subscriber of elsewhere, nobody anywhere has nobody;
	// both changes are notified from B, then the fence.
	ve := store.Bump(elsewhere)
	store.Bump(nobody)
	for _, k := range []shared.EntityKey{elsewhere, nobody} {
		if err := b.NotifyAllOfChange(k); err != nil {
			t.Fatal(err)
		}
	}
	fv := store.Bump(fence)
	if err := b.NotifyAllOfChange(fence); err != nil {
		t.Fatal(err)
	}
	// Each server takes its notifications in publish order, one at a time:
	// once the fence has reached B's client, B has handled the other two.
	awaitVersion(t, progress, append(onA, onB...), fence, fv)
	awaitVersion(t, progress, onA, elsewhere, ve)

	dA, dB := a.Bridge.Stats(), b.Bridge.Stats()
	if got := dB.Received - stB.Received; got != 3 {
		t.Errorf("server B received %d notifications, want 3", got)
	}
	if got := dB.Fetches - stB.Fetches; got != 1 {
		t.Errorf("server B fetched %d times, want 1 (the fence only)", got)
	}
	if got := dA.Fetches - stA.Fetches; got != 2 {
		t.Errorf("server A fetched %d times, want 2 (its two keys)", got)
	}
	if got := store.FetchesOf(elsewhere) - base; got != 1 {
		t.Errorf("%s fetched %d times, want 1 (by server A)", elsewhere, got)
	}
	if got := store.FetchesOf(nobody); got != 0 {
		t.Errorf("%s, which nobody subscribes to, was fetched %d times", nobody, got)
	}
	if dB.Keys != 1 || dA.Keys != 2 {
		t.Errorf("index sizes: A %d keys, B %d keys; want 2 and 1", dA.Keys, dB.Keys)
	}
}

// flaky fails (or panics) for the next calls it is armed for, then fetches
// from the store.
type flaky struct {
	store *testkit.Store
	left  atomic.Int64
	panic bool
	calls atomic.Int64
}

func (f *flaky) fetch(ctx context.Context, key shared.EntityKey) ([][]byte, error) {
	f.calls.Add(1)
	if f.left.Add(-1) >= 0 {
		if f.panic {
			panic("database driver bug")
		}
		return nil, errors.New("database unavailable")
	}
	return f.store.Fetch(ctx, key)
}

func (f *flaky) seed(key shared.EntityKey, secret string, handler shared.ByteHandler) {
	f.calls.Add(1)
	if f.left.Add(-1) >= 0 {
		panic("database driver bug") // the seed's handler has no error to return
	}
	f.store.SeedHandler(key, secret, handler)
}

func TestFailingFetchIsRetriedUntilClientsConverge(t *testing.T) {
	const failures = 3
	for _, tc := range []struct {
		name  string
		panic bool
		seed  bool
	}{
		{"error", false, false},
		{"panic", true, false},
		{"seed handler panic", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &flaky{store: testkit.NewStore(), panic: tc.panic}
			f.left.Store(failures)
			e, srv := testkit.Serve(t, es.Config{
				Bridge: esbridge.Options{RetryDelay: 10 * time.Millisecond, MaxRetryDelay: 50 * time.Millisecond},
				Logger: testkit.SilentLogger(), // every failure logs an error, by design
			})
			var err error
			if tc.seed {
				err = e.RegisterEntityAndDBHandler("items", f.seed)
			} else {
				err = e.Register("items", f.fetch)
			}
			if err != nil {
				t.Fatal(err)
			}

			// The initial state arrives once the fetch recovers.
			progress := testkit.NewProgress()
			var trs []*testkit.Tracker
			for i := 0; i < 5; i++ {
				tr := testkit.DialTracker(t, srv, testkit.TrackerOptions{Progress: progress})
				if tr == nil {
					t.FailNow()
				}
				if err := tr.Subscribe(hot); err != nil {
					t.Fatal(err)
				}
				trs = append(trs, tr)
			}
			awaitVersion(t, progress, trs, hot, 0)
			if got := e.Bridge.Stats().FetchErrors; got != failures {
				t.Errorf("%d fetch errors counted, want %d", got, failures)
			}

			// A change while the database fails again.
			f.left.Store(failures)
			v := f.store.Bump(hot)
			if err := e.NotifyAllOfChange(hot); err != nil {
				t.Fatal(err)
			}
			awaitVersion(t, progress, trs, hot, v)
			if got := e.Bridge.Stats().FetchErrors; got != 2*failures {
				t.Errorf("%d fetch errors counted, want %d", got, 2*failures)
			}
			checkNoBackwards(t, trs)

			// The server is still whole: a new client is served at once.
			late := subscribeAll(t, srv, progress, 1, hot)
			awaitVersion(t, progress, late, hot, v)
			t.Logf("%d fetch calls in all", f.calls.Load())
		})
	}
}
