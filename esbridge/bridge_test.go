package esbridge_test

// Deterministic tests of the bridge on its own: the in-process queue, a
// fetcher whose rows are a version per key (and the secret, for per-secret
// entities), and clients read through the bridge's own queue (Ready, Take).

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

const unitWait = 10 * time.Second

// versions is a fetcher: each key has a version the test bumps; its one row
// is "<secret>:<version>" (the secret only for per-secret entities).
type versions struct {
	perSecret bool
	mu        sync.Mutex
	v         map[shared.EntityKey]int
	fetches   atomic.Int64
	// gate, if set, is called at the start of every fetch.
	gate func(shared.EntityKey)
}

func newVersions() *versions { return &versions{v: make(map[shared.EntityKey]int)} }

func (f *versions) bump(k shared.EntityKey) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.v[k]++
	return f.v[k]
}

func (f *versions) Fetch(_ context.Context, k shared.EntityKey, secret string) ([][]byte, error) {
	f.fetches.Add(1)
	if f.gate != nil {
		f.gate(k)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.perSecret {
		secret = ""
	}
	return [][]byte{[]byte(fmt.Sprintf("%s:%d", secret, f.v[k]))}, nil
}

func (f *versions) PerSecret(shared.EntityType) bool { return f.perSecret }

func quietLogger() *logrus.Logger {
	l := logrus.New()
	l.SetLevel(logrus.PanicLevel)
	return l
}

func newUnitBridge(t *testing.T, f esbridge.Fetcher, opts esbridge.Options) *esbridge.Bridge {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = quietLogger()
	}
	b := esbridge.New(esq.NewMemory(), f, opts)
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

// next waits for the client's next batch of updates.
func next(t *testing.T, c *esbridge.Client) []*esbridge.Update {
	t.Helper()
	timeout := time.After(unitWait)
	for {
		if batch := c.Take(nil); len(batch) > 0 {
			return batch
		}
		select {
		case <-c.Ready():
		case <-timeout:
			t.Fatal("no update within the wait")
		}
	}
}

// nextOne waits for exactly one update of key.
func nextOne(t *testing.T, c *esbridge.Client, key shared.EntityKey) *esbridge.Update {
	t.Helper()
	batch := next(t, c)
	if len(batch) != 1 || batch[0].Key != key {
		t.Fatalf("got %d updates %v, want one of %s", len(batch), batch, key)
	}
	return batch[0]
}

func row(u *esbridge.Update) string {
	if len(u.Rows) != 1 {
		return fmt.Sprintf("%d rows", len(u.Rows))
	}
	return string(u.Rows[0])
}

var k1 = shared.EntityKey{Entity: "items", ID: "1"}

func TestSubscribeToAHeldKeyCostsNoFetch(t *testing.T) {
	f := newVersions()
	f.bump(k1)
	b := newUnitBridge(t, f, esbridge.Options{})
	c1 := b.ClientBuilder(nil)
	if err := c1.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	first := nextOne(t, c1, k1)
	// The state is held: a second client gets it at once, without a fetch.
	c2 := b.ClientBuilder(nil)
	if err := c2.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	got := c2.Take(nil)
	if len(got) != 1 || row(got[0]) != "1" && row(got[0]) != ":1" {
		t.Fatalf("second subscriber got %v right after Subscribe, want the held state", got)
	}
	if got[0] != first {
		t.Error("the held state was copied for a client that had seen no Seq: it should be shared (one encoding)")
	}
	if n := f.fetches.Load(); n != 1 {
		t.Errorf("%d fetches, want 1", n)
	}
}

func TestResubscribeResendsTheStateUnderAHigherSeq(t *testing.T) {
	f := newVersions()
	b := newUnitBridge(t, f, esbridge.Options{})
	c := b.ClientBuilder(nil)
	if err := c.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	u1 := nextOne(t, c, k1)
	if err := c.Subscribe(k1); err != nil { // the client lost track: send it again
		t.Fatal(err)
	}
	u2 := nextOne(t, c, k1)
	if row(u2) != row(u1) || u2.Seq <= u1.Seq {
		t.Errorf("resend: %q seq %d after %q seq %d, want the same rows under a higher seq", row(u2), u2.Seq, row(u1), u1.Seq)
	}
	if n := f.fetches.Load(); n != 1 {
		t.Errorf("%d fetches, want 1: a held key is resent, not fetched", n)
	}
	c.Unsubscribe(k1)
	if err := c.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	if u3 := nextOne(t, c, k1); u3.Seq <= u2.Seq {
		t.Errorf("after unsubscribe and subscribe: seq %d, not above %d", u3.Seq, u2.Seq)
	}
}

// The review's defect: joining another secret's group handed the client
// that group's state under its old seq, lower than one it had applied, so
// the client dropped it and stayed on the old secret's rows.
func TestSecretSwitchDeliversTheNewSecretsState(t *testing.T) {
	f := newVersions()
	f.perSecret = true
	b := newUnitBridge(t, f, esbridge.Options{})
	a, other := b.ClientBuilder(nil), b.ClientBuilder(nil)
	a.SetSecret("a")
	other.SetSecret("b")
	if err := other.Subscribe(k1); err != nil { // group b's state is the older one
		t.Fatal(err)
	}
	nextOne(t, other, k1)
	if err := a.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	ua := nextOne(t, a, k1)
	a.SetSecret("b")
	ub := nextOne(t, a, k1)
	if row(ub) != "b:0" || ub.Seq <= ua.Seq {
		t.Fatalf("after the switch: %q seq %d (had %q seq %d), want b's rows under a higher seq", row(ub), ub.Seq, row(ua), ua.Seq)
	}
	if n := f.fetches.Load(); n != 2 {
		t.Errorf("%d fetches, want 2: joining a held group costs none", n)
	}
}

func TestSecretChangeDropsWhatTheOldSecretQueued(t *testing.T) {
	f := newVersions()
	f.perSecret = true
	b := newUnitBridge(t, f, esbridge.Options{})
	c := b.ClientBuilder(nil)
	c.SetSecret("admin")
	if err := c.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	nextOne(t, c, k1)
	f.bump(k1)
	if err := b.NotifyAllOfChange(k1); err != nil {
		t.Fatal(err)
	}
	select { // admin:1 is queued, not taken
	case <-c.Ready():
	case <-time.After(unitWait):
		t.Fatal("change not queued")
	}
	c.SetSecret("") // log out
	for _, u := range next(t, c) {
		if strings.HasPrefix(row(u), "admin") {
			t.Fatalf("after the secret changed the client was handed %q", row(u))
		}
		if row(u) != ":1" {
			t.Errorf("got %q, want the anonymous state :1", row(u))
		}
	}
}

func TestAuthorizePanicRefusesTheKeyOnly(t *testing.T) {
	f := newVersions()
	b := newUnitBridge(t, f, esbridge.Options{Authorize: func(_ context.Context, k shared.EntityKey) error {
		if k.ID == "boom" {
			panic("app bug")
		}
		return nil
	}})
	c := b.ClientBuilder(nil)
	err := c.Subscribe(shared.EntityKey{Entity: "items", ID: "boom"})
	if !errors.Is(err, shared.ErrForbidden) {
		t.Fatalf("Subscribe after an Authorize panic: %v, want ErrForbidden", err)
	}
	if err := c.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	nextOne(t, c, k1)
}

// A client whose row filter panicked got nothing, and must still get the
// state at the next round even if the rows did not change.
func TestFilterPanicDoesNotCountAsServed(t *testing.T) {
	f := newVersions()
	var panicked atomic.Bool
	first := make(chan struct{})
	b := newUnitBridge(t, f, esbridge.Options{Filter: func(_ context.Context, _ shared.EntityKey, rows [][]byte) [][]byte {
		if !panicked.Swap(true) {
			close(first)
			panic("app bug")
		}
		return rows
	}})
	c := b.ClientBuilder(nil)
	if err := c.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	<-first
	if err := b.NotifyAllOfChange(k1); err != nil { // same rows
		t.Fatal(err)
	}
	if u := nextOne(t, c, k1); row(u) != ":0" {
		t.Errorf("got %q", row(u))
	}
}

// A flood of keys to fetch is served by at most MaxConcurrentFetches
// goroutines, not one per key.
func TestFetchRoundsRunOnABoundedPool(t *testing.T) {
	const keys, pool = 500, 4
	f := newVersions()
	release := make(chan struct{})
	var running, most atomic.Int64
	f.gate = func(shared.EntityKey) {
		n := running.Add(1)
		defer running.Add(-1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		<-release
	}
	b := newUnitBridge(t, f, esbridge.Options{MaxConcurrentFetches: pool})
	before := runtime.NumGoroutine()
	clients := make([]*esbridge.Client, keys)
	for i := range clients {
		clients[i] = b.ClientBuilder(nil)
		if err := clients[i].Subscribe(shared.EntityKey{Entity: "items", ID: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if g := runtime.NumGoroutine() - before; g > pool {
		t.Errorf("%d goroutines for %d keys waiting to be fetched, want at most %d", g, keys, pool)
	}
	close(release)
	for i, c := range clients {
		nextOne(t, c, shared.EntityKey{Entity: "items", ID: fmt.Sprint(i)})
	}
	if m := most.Load(); m > pool {
		t.Errorf("%d fetches at once, want at most %d", m, pool)
	}
}

// Per-key order under everything at once: notifications, resubscribes,
// unsubscribes and secret changes, with clients reading at their own pace.
// Every client sees increasing seqs and ends on the final state.
func TestPerKeyOrderAndConvergenceUnderChurn(t *testing.T) {
	const clients, changes = 8, 300
	f := newVersions()
	b := newUnitBridge(t, f, esbridge.Options{})
	var wg sync.WaitGroup
	done := make(chan struct{})
	errs := make(chan error, clients)
	for i := 0; i < clients; i++ {
		c := b.ClientBuilder(nil)
		if err := c.Subscribe(k1); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var last uint64
			var state string
			check := func(batch []*esbridge.Update) bool {
				for _, u := range batch {
					if u.Seq <= last {
						errs <- fmt.Errorf("client %d: seq %d after %d", i, u.Seq, last)
						return false
					}
					last, state = u.Seq, row(u)
				}
				return true
			}
			for n := 0; ; n++ {
				select {
				case <-done:
					// Quiescent: the final state must be there or arrive.
					want := fmt.Sprintf(":%d", changes)
					deadline := time.After(unitWait)
					for state != want {
						if !check(c.Take(nil)) {
							return
						}
						if state == want {
							break
						}
						select {
						case <-c.Ready():
						case <-deadline:
							errs <- fmt.Errorf("client %d ended on %q, want %q", i, state, want)
							return
						}
					}
					return
				case <-c.Ready():
				}
				if !check(c.Take(nil)) {
					return
				}
				switch n % 7 {
				case 3:
					_ = c.Subscribe(k1) // resend
				case 5:
					c.SetSecret(fmt.Sprint(n)) // not per secret: no change of rows
				}
			}
		}(i)
	}
	for i := 0; i < changes; i++ {
		f.bump(k1)
		if err := b.NotifyAllOfChange(k1); err != nil {
			t.Fatal(err)
		}
	}
	close(done)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
