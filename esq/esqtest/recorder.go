package esqtest

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

type suite struct {
	f  Factory
	ft Features
}

// queue returns a new instance that is closed when the test ends.
func (s *suite) queue(t testing.TB) esq.Queue {
	t.Helper()
	q := s.f.NewQueue(t)
	if q == nil {
		t.Fatal("esqtest: Factory.NewQueue returned nil")
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), s.ft.Timeout)
		defer cancel()
		_ = q.Close(ctx) // closing twice is allowed; errors are the Close subtest's business
	})
	return q
}

// queues returns n instances; with SingleProcess, the same single instance
// n times.
func (s *suite) queues(t testing.TB, n int) []esq.Queue {
	t.Helper()
	out := make([]esq.Queue, n)
	for i := range out {
		if s.ft.SingleProcess && i > 0 {
			out[i] = out[0]
			continue
		}
		out[i] = s.queue(t)
	}
	return out
}

// body is a notification as the bridge sends it: an entity key as JSON.
func body(entity shared.EntityType, id string) []byte {
	b, err := json.Marshal(shared.EntityKey{Entity: entity, ID: id})
	if err != nil {
		panic(err)
	}
	return b
}

// recorder collects what one subscription receives.
type recorder struct {
	name string

	mu     sync.Mutex
	got    map[string]int // body -> times received
	total  int
	losses int

	changed chan struct{} // a token when anything was recorded

	// closed is set once the queue's Close has returned; a callback after
	// that counts in late.
	closed atomic.Bool
	late   atomic.Int64
	// lossHook, if set, is called (without blocking) on each loss.
	lossHook func(n int)
}

func newRecorder(name string) *recorder {
	return &recorder{name: name, got: make(map[string]int), changed: make(chan struct{}, 1)}
}

func (r *recorder) signal() {
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

func (r *recorder) onMessage(b []byte) {
	if r.closed.Load() {
		r.late.Add(1)
	}
	r.mu.Lock()
	r.got[string(b)]++
	r.total++
	r.mu.Unlock()
	r.signal()
}

func (r *recorder) onLoss() {
	if r.closed.Load() {
		r.late.Add(1)
	}
	r.mu.Lock()
	r.losses++
	n := r.losses
	r.mu.Unlock()
	if r.lossHook != nil {
		r.lossHook(n)
	}
	r.signal()
}

// has reports whether b was received.
func (r *recorder) has(b []byte) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.got[string(b)] > 0
}

// count returns how many of bodies were received at least once.
func (r *recorder) count(bodies [][]byte) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, b := range bodies {
		if r.got[string(b)] > 0 {
			n++
		}
	}
	return n
}

// await waits until cond holds, checking it after every recorded event,
// and fails t with cond's description after timeout.
func (r *recorder) await(t testing.TB, timeout time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		ok, why := cond()
		if ok {
			return
		}
		select {
		case <-r.changed:
		case <-deadline.C:
			t.Fatalf("%s: after %s: %s", r.name, timeout, why)
		}
	}
}

// awaitAll waits until every body in bodies was received.
func (r *recorder) awaitAll(t testing.TB, timeout time.Duration, bodies [][]byte, hint string) {
	t.Helper()
	r.await(t, timeout, func() (bool, string) {
		n := r.count(bodies)
		if n == len(bodies) {
			return true, ""
		}
		return false, fmt.Sprintf("received %d of %d messages%s", n, len(bodies), hint)
	})
}

// checkOnly fails t if r received anything outside want, or (without
// duplicates allowed) anything twice.
func (r *recorder) checkOnly(t testing.TB, want [][]byte, dupsOK bool) {
	t.Helper()
	wanted := make(map[string]bool, len(want))
	for _, b := range want {
		wanted[string(b)] = true
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var foreign, dups []string
	for b, n := range r.got {
		if !wanted[b] {
			foreign = append(foreign, b)
		} else if n > 1 && !dupsOK {
			dups = append(dups, fmt.Sprintf("%s x%d", b, n))
		}
	}
	if len(foreign) > 0 {
		t.Errorf("%s: received %d messages it did not subscribe to, e.g. %s", r.name, len(foreign), sample(foreign))
	}
	if len(dups) > 0 {
		t.Errorf("%s: received %d messages more than once (set Features.Duplicates if the queue may redeliver), e.g. %s", r.name, len(dups), sample(dups))
	}
}

func sample(s []string) string {
	if len(s) > 3 {
		s = s[:3]
	}
	return strings.Join(s, ", ")
}

// subscribe subscribes r on q, failing t on error.
func subscribe(t testing.TB, q esq.Queue, entity shared.EntityType, r *recorder) {
	t.Helper()
	if err := q.Subscribe(entity, r.onMessage, r.onLoss); err != nil {
		t.Fatalf("subscribe %q: %v", entity, err)
	}
}

// publish publishes on q, failing t on error.
func publish(t testing.TB, q esq.Queue, entity shared.EntityType, b []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := q.Publish(ctx, entity, b); err != nil {
		t.Fatalf("publish on %q: %v", entity, err)
	}
}
