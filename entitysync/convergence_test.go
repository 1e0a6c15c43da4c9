package entitysync_test

import (
	"errors"
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// The burst scenario of guarantees 2 (convergence) and 4 (per-key order):
// several servers on one real nsqd, many websocket clients each subscribed
// to a random subset of the keys, and a burst of changes notified from random
// servers by concurrent publishers.
type burst struct {
	servers       int
	clients       int
	keys          int
	keysPerClient int
	changes       int
	publishers    int
	// restart stops nsqd and starts it again on the same port once half of
	// the changes are published.
	restart bool
}

var fullBurst = burst{servers: 3, clients: 200, keys: 100, keysPerClient: 10, changes: 5000, publishers: 4}

func TestConvergenceUnderBurst(t *testing.T) {
	runBurst(t, fullBurst)
}

func TestConvergenceAcrossNSQDRestart(t *testing.T) {
	b := fullBurst
	b.restart = true
	runBurst(t, b)
}

// burstSeed returns the seed of the scenario's randomness: ES_SEED if set
// (to replay a failure), else the clock.
func burstSeed(t *testing.T) int64 {
	t.Helper()
	seed := time.Now().UnixNano()
	if s := os.Getenv("ES_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseInt(s, 10, 64); err != nil {
			t.Fatalf("ES_SEED=%q: %v", s, err)
		}
	}
	t.Logf("seed %d (replay with ES_SEED=%d)", seed, seed)
	return seed
}

type burstClient struct {
	tr   *testkit.Tracker
	keys []shared.EntityKey
}

func runBurst(t *testing.T, b burst) {
	seed := burstSeed(t)
	rng := rand.New(rand.NewSource(seed))
	nsqd := nsqtest.StartNSQD(t)
	store := testkit.NewStore()

	logger := testkit.Logger()
	if b.restart {
		// The restart makes every producer and consumer log connection
		// errors by the hundred: they are expected here.
		logger = testkit.SilentLogger()
	}
	servers := make([]server, b.servers)
	for i := range servers {
		e, srv := testkit.Serve(t, es.Config{
			NSQAddr: nsqd.TCPAddr(),
			NSQ:     esq.NSQConfig{ReconnectInterval: 200 * time.Millisecond, WatchInterval: 50 * time.Millisecond},
			Logger:  logger,
		})
		if err := e.Register("items", store.Fetch); err != nil {
			t.Fatalf("server %d: register: %v", i, err)
		}
		servers[i] = server{e, srv}
	}

	// Clients, round-robin over the servers, each on a random subset.
	start := time.Now()
	keys, clients, progress := subscribeBurst(t, rng, b, servers)
	t.Logf("%d clients subscribed to %d keys each on %d servers; all initial states in %s",
		b.clients, b.keysPerClient, b.servers, time.Since(start).Round(time.Millisecond))
	checkOrder(t, clients)

	before := make([]uint64, len(servers))
	for i, s := range servers {
		before[i] = s.es.Bridge.Stats().Fetches
	}
	storeBefore := store.Fetches()

	// The burst: every change is a Bump (the write) then a notify from a
	// random server. A notify that fails (nsqd down) is retried until it
	// succeeds, as an application must; the library only reports the error.
	var midway func()
	if b.restart {
		midway = func() {
			if err := nsqd.Restart(); err != nil {
				t.Fatal(err)
			}
		}
	}
	res := publishAndConverge(t, b, seed, keys, servers, store, progress, clients, midway)
	burstTook, convergeTook := res.burstTook, res.convergeTook

	if b.restart {
		// Every server lost its nsqd connection and must have re-fetched its
		// keys once the subscription was live again.
		testkit.AwaitCond(t, 30*time.Second, func() (bool, string) {
			for i, s := range servers {
				if s.es.Bridge.Stats().Resyncs == 0 {
					return false, fmt.Sprintf("server %d has not resynced", i)
				}
			}
			return true, ""
		})
	} else {
		// Guarantee 1 with nothing lost in between: every server receives
		// every notification (convergence alone can be reached without the
		// last few, when an earlier fetch already saw the final rows).
		testkit.AwaitCond(t, 30*time.Second, func() (bool, string) {
			for i, s := range servers {
				if n := s.es.Bridge.Stats().Received; n < uint64(b.changes) { // NSQ may redeliver: at least once
					return false, fmt.Sprintf("server %d received %d of %d notifications", i, n, b.changes)
				}
			}
			return true, ""
		})
		for i, s := range servers {
			if n := s.es.Bridge.Stats().Resyncs; n != 0 {
				t.Errorf("server %d resynced %d times with no broker loss", i, n)
			}
		}
	}

	frames := 0
	for _, c := range clients {
		frames += c.tr.TotalFrames()
	}
	var fetches uint64
	for i, s := range servers {
		st := s.es.Bridge.Stats()
		fetches += st.Fetches - before[i]
		t.Logf("server %d: received %d, fetches %d (%d in the burst), deliveries %d, resyncs %d",
			i, st.Received, st.Fetches, st.Fetches-before[i], st.Deliveries, st.Resyncs)
	}
	t.Logf("burst of %d changes published in %s (%d failed notifies retried); converged %s after the last publish",
		b.changes, burstTook.Round(time.Millisecond), res.failures, convergeTook.Round(time.Millisecond))
	t.Logf("fetches for the burst: %d (store: %d) vs %d changes x %d servers = %d without coalescing (%.1f%%); frames received: %d",
		fetches, store.Fetches()-storeBefore, b.changes, b.servers, b.changes*b.servers,
		100*float64(fetches)/float64(b.changes*b.servers), frames)
	if fetches == 0 || fetches > uint64(b.changes*b.servers)+uint64(b.keys*b.servers) {
		// At most one fetch per notification per server, plus one resync
		// fetch per subscribed key per server.
		t.Errorf("%d fetches for %d changes on %d servers", fetches, b.changes, b.servers)
	}
}

// notifyUntilAccepted notifies until the queue accepts, backing off between
// attempts, for at most 30s.
// burstResult is what publishAndConverge measured.
type burstResult struct {
	burstTook, convergeTook time.Duration
	failures                int64 // notifies that failed and were retried
}

// publishAndConverge publishes b.changes changes of random keys (a Bump, then a
// notify through a random server, retried until accepted) from
// b.publishers goroutines, calls midway once half of them are published
// (when midway is not nil: the broker fault of the test), then waits until
// every client holds the final version of every key it subscribes to and
// checks per-key order.
func publishAndConverge(t *testing.T, b burst, seed int64, keys []shared.EntityKey, servers []server, store *testkit.Store,
	progress *testkit.Progress, clients []burstClient, midway func()) burstResult {
	t.Helper()
	start := time.Now()
	var published, failures atomic.Int64
	half := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, b.publishers)
	for p := 0; p < b.publishers; p++ {
		n := b.changes / b.publishers
		if p == 0 {
			n += b.changes % b.publishers
		}
		prng := rand.New(rand.NewSource(seed + int64(p) + 1))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < n; j++ {
				k := keys[prng.Intn(b.keys)]
				store.Bump(k)
				if err := notifyUntilAccepted(servers[prng.Intn(b.servers)].es, k, &failures); err != nil {
					errs <- err
					return
				}
				if published.Add(1) == int64(b.changes/2) {
					close(half)
				}
			}
		}()
	}
	publishersDone := make(chan struct{})
	go func() { wg.Wait(); close(publishersDone) }()
	if midway != nil {
		select {
		case <-half:
		case <-publishersDone:
			t.Fatal("publishers stopped before half of the burst")
		case <-time.After(60 * time.Second):
			t.Fatal("half of the burst not published within 60s")
		}
		midway()
		t.Logf("fault injected after %d of %d changes", published.Load(), b.changes)
	}
	select {
	case <-publishersDone:
	case <-time.After(90 * time.Second):
		t.Fatalf("burst not published within 90s (%d of %d)", published.Load(), b.changes)
	}
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	r := burstResult{burstTook: time.Since(start), failures: failures.Load()}

	// Convergence: nothing bumps any more, so the final versions are fixed.
	final := make(map[shared.EntityKey]int, len(keys))
	for _, k := range keys {
		final[k] = store.Version(k)
	}
	start = time.Now()
	awaitAll(t, progress, clients, 60*time.Second, "final versions", func(k shared.EntityKey) (int, bool) { return final[k], true })
	r.convergeTook = time.Since(start)
	checkOrder(t, clients)
	return r
}

func notifyUntilAccepted(e *es.EntitySync, k shared.EntityKey, failures *atomic.Int64) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := e.NotifyAllOfChange(k)
		if err == nil {
			return nil
		}
		failures.Add(1)
		if errors.Is(err, esbridge.ErrClosed) {
			return err // the test is over
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("notify %s still failing after 30s: %w", k, err)
		}
		<-time.After(10 * time.Millisecond) // retry backoff while nsqd is away
	}
}

// subscribeBurst makes the scenario's keys and clients: each client dials
// a server (round-robin) and subscribes to a random subset of the keys; it
// returns once every client holds an initial state of each.
func subscribeBurst(t *testing.T, rng *rand.Rand, b burst, servers []server) ([]shared.EntityKey, []burstClient, *testkit.Progress) {
	t.Helper()
	keys := make([]shared.EntityKey, b.keys)
	for i := range keys {
		keys[i] = key("items", fmt.Sprintf("k%03d", i))
	}
	progress := testkit.NewProgress()
	clients := make([]burstClient, b.clients)
	for i := range clients {
		c := burstClient{tr: testkit.DialTracker(t, servers[i%b.servers].srv, testkit.TrackerOptions{Progress: progress})}
		if c.tr == nil {
			t.FailNow()
		}
		for _, k := range rng.Perm(b.keys)[:b.keysPerClient] {
			c.keys = append(c.keys, keys[k])
			if err := c.tr.Subscribe(keys[k]); err != nil {
				t.Fatalf("client %d: subscribe: %v", i, err)
			}
		}
		clients[i] = c
	}
	awaitAll(t, progress, clients, 30*time.Second, "initial state", func(shared.EntityKey) (int, bool) { return 0, false })
	return keys, clients, progress
}

// awaitAll waits until every client holds, for every key it subscribed to,
// the version want returns (any version if want says false).
func awaitAll(t *testing.T, progress *testkit.Progress, clients []burstClient, timeout time.Duration, what string, want func(shared.EntityKey) (int, bool)) {
	t.Helper()
	// Versions only grow, so a (client, key) pair once done stays done: the
	// check resumes where it stopped.
	ci, ki := 0, 0
	progress.Await(t, timeout, func() (bool, string) {
		for ; ci < len(clients); ci, ki = ci+1, 0 {
			c := clients[ci]
			for ; ki < len(c.keys); ki++ {
				k := c.keys[ki]
				got, ok := c.tr.Latest(k)
				w, exact := want(k)
				if !ok || (exact && got < w) {
					if err := c.tr.CloseErr(); err != nil {
						t.Fatalf("client %d lost its connection: %v", ci, err)
					}
					return false, fmt.Sprintf("%s: client %d has %s at v%d (received: %v), want v%d", what, ci, k, got, ok, w)
				}
				if exact && got > w {
					t.Fatalf("client %d has %s at v%d, beyond the store's v%d", ci, k, got, w)
				}
			}
		}
		return true, ""
	})
}

// checkOrder fails the test if any client saw a key go back in time, or got
// a frame that is not a row.
func checkOrder(t *testing.T, clients []burstClient) {
	t.Helper()
	for i, c := range clients {
		if bw := c.tr.Backwards(); len(bw) > 0 {
			t.Errorf("client %d: per-key order broken: %v", i, bw)
		}
		if f := c.tr.Foreign(); len(f) > 0 {
			t.Errorf("client %d: frames that are not rows: %v", i, f)
		}
	}
}
