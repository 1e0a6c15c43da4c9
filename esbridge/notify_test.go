package esbridge_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// flakyQueue is an in-process broker whose Publish the test can hold and make
// fail: it stands in for a slow or failing broker, not for the bridge.
type flakyQueue struct {
	*esq.Memory
	hold      chan struct{} // while open, Publish waits on it
	entered   chan struct{} // if set, told of every Publish call
	failures  atomic.Int64  // Publish fails this many more times
	succeeded atomic.Int64  // publishes that reached the broker
	calls     atomic.Int64
}

func (q *flakyQueue) Publish(ctx context.Context, entity shared.EntityType, body []byte) error {
	q.calls.Add(1)
	if q.entered != nil {
		q.entered <- struct{}{}
	}
	if q.hold != nil {
		select {
		case <-q.hold:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if q.failures.Add(-1) >= 0 {
		return errors.New("broker unreachable")
	}
	if err := q.Memory.Publish(ctx, entity, body); err != nil {
		return err
	}
	q.succeeded.Add(1)
	return nil
}

// doneWatch is a context that tells when its Done is first asked for: a
// FlushNotifications that calls it has read what it waits for.
type doneWatch struct {
	context.Context
	once   sync.Once
	called chan struct{}
}

func (c *doneWatch) Done() <-chan struct{} {
	c.once.Do(func() { close(c.called) })
	return c.Context.Done()
}

func TestNotifyAsyncPublishesQueuedKeysOnceEach(t *testing.T) {
	q := &flakyQueue{Memory: esq.NewMemory(), hold: make(chan struct{}), entered: make(chan struct{}, 8)}
	f := newVersions()
	b := esbridge.New(q, f, esbridge.Options{Logger: quietLogger()})
	if err := b.ServeEntity("items"); err != nil {
		t.Fatal(err)
	}
	c := b.ClientBuilder(nil)
	if err := c.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	nextOne(t, c, k1)
	// The broker is slow: the first publish waits. The key notified
	// meanwhile is queued again (that publish may be too early for the new
	// writes), and only once however often it is notified.
	f.bump(k1)
	if err := b.NotifyAsync(k1); err != nil {
		t.Fatal(err)
	}
	<-q.entered
	for i := 0; i < 49; i++ {
		f.bump(k1)
		if err := b.NotifyAsync(k1); err != nil {
			t.Fatal(err)
		}
	}
	close(q.hold)
	ctx, cancel := context.WithTimeout(context.Background(), unitWait)
	defer cancel()
	if err := b.FlushNotifications(ctx); err != nil {
		t.Fatal(err)
	}
	if n := q.calls.Load(); n != 2 {
		t.Errorf("%d publishes for one key notified once, then 49 times while its publish was in flight; want 2", n)
	}
	for u := nextOne(t, c, k1); row(u) != ":50"; u = nextOne(t, c, k1) {
	}
	if err := b.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestNotifyAsyncRetriesAndReportsFailures(t *testing.T) {
	q := &flakyQueue{Memory: esq.NewMemory()}
	q.failures.Store(3)
	var reported atomic.Int64
	b := esbridge.New(q, newVersions(), esbridge.Options{Logger: quietLogger(), RetryDelay: time.Millisecond,
		OnNotifyError: func(k shared.EntityKey, err error) {
			if k != k1 || err == nil {
				t.Errorf("reported %v for %s", err, k)
			}
			reported.Add(1)
		}})
	if err := b.ServeEntity("items"); err != nil {
		t.Fatal(err)
	}
	if err := b.NotifyAsync(k1); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), unitWait)
	defer cancel()
	if err := b.FlushNotifications(ctx); err != nil {
		t.Fatal(err)
	}
	if n := reported.Load(); n != 3 {
		t.Errorf("%d failures reported, want 3", n)
	}
	if st := b.Stats(); st.Notifications != 1 || st.NotifyErrors != 3 || st.Pending != 0 {
		t.Errorf("stats %+v, want 1 notification after 3 errors, none pending", st)
	}
	if err := b.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestNotifyAsyncBacklogIsBoundedAndCloseSaysWhatWasLost(t *testing.T) {
	base := len(testkit.Goroutines())
	q := &flakyQueue{Memory: esq.NewMemory(), hold: make(chan struct{})} // never released
	b := esbridge.New(q, newVersions(), esbridge.Options{Logger: quietLogger(), MaxPendingNotifications: 3})
	for _, id := range []string{"1", "2", "3"} {
		if err := b.NotifyAsync(shared.EntityKey{Entity: "items", ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.NotifyAsync(shared.EntityKey{Entity: "items", ID: "4"}); !errors.Is(err, esbridge.ErrNotifyBacklog) {
		t.Fatalf("fourth key: %v, want ErrNotifyBacklog", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := b.Close(ctx); err == nil {
		t.Fatal("Close said nothing of 3 notifications it could not publish")
	}
	if err := b.NotifyAsync(k1); !errors.Is(err, esbridge.ErrClosed) {
		t.Errorf("NotifyAsync after Close: %v", err)
	}
	testkit.AwaitGoroutines(t, base, unitWait)
}

// NotifyKeysAsync queues keys together and publishes them in one message
// per entity type, retried as a whole; the keys' subscribers get their new
// states.
func TestNotifyKeysAsyncPublishesOneMessage(t *testing.T) {
	q := &flakyQueue{Memory: esq.NewMemory()}
	q.failures.Store(1)
	f := newVersions()
	var reported atomic.Int64
	b := esbridge.New(q, f, esbridge.Options{Logger: quietLogger(), RetryDelay: time.Millisecond,
		OnNotifyError: func(shared.EntityKey, error) { reported.Add(1) }})
	if err := b.ServeEntity("items"); err != nil {
		t.Fatal(err)
	}
	keys := []shared.EntityKey{{Entity: "items", ID: "1"}, {Entity: "items", ID: "2"}, {Entity: "items", ID: "3"}}
	clients := make([]*esbridge.Client, len(keys))
	want := make([]string, len(keys))
	for i, k := range keys {
		clients[i] = b.ClientBuilder(nil)
		if err := clients[i].Subscribe(k); err != nil {
			t.Fatal(err)
		}
		nextOne(t, clients[i], k)
		want[i] = fmt.Sprintf(":%d", f.bump(k))
	}
	if err := b.NotifyKeysAsync(append(keys, keys[1])...); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), unitWait)
	defer cancel()
	if err := b.FlushNotifications(ctx); err != nil {
		t.Fatal(err)
	}
	for i, k := range keys {
		if u := nextOne(t, clients[i], k); row(u) != want[i] {
			t.Errorf("%s: got %s, want %s", k, row(u), want[i])
		}
	}
	if n := q.calls.Load(); n != 2 {
		t.Errorf("%d publishes for 3 keys of one type (the first failing), want 2", n)
	}
	if st := b.Stats(); st.Notifications != 3 || st.NotifyErrors != 1 || st.Pending != 0 || reported.Load() != 1 {
		t.Errorf("stats %+v, %d reported; want 3 keys published after 1 error, none pending", st, reported.Load())
	}
	if err := b.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

// A flush that began while a key's publish was in flight waits for that key
// to be published, even when the key is queued again meanwhile and the
// publish in flight fails: the failed publish is not counted as done.
func TestFlushWaitsForAKeyWhosePublishFailedAfterItWasQueuedAgain(t *testing.T) {
	q := &flakyQueue{Memory: esq.NewMemory(), hold: make(chan struct{}), entered: make(chan struct{}, 8)}
	q.failures.Store(1)
	failed := make(chan struct{}, 8)
	b := esbridge.New(q, newVersions(), esbridge.Options{Logger: quietLogger(), RetryDelay: 100 * time.Millisecond,
		OnNotifyError: func(shared.EntityKey, error) { failed <- struct{}{} }})
	if err := b.ServeEntity("items"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), unitWait)
	t.Cleanup(func() {
		defer cancel()
		if err := b.Close(ctx); err != nil {
			t.Error(err)
		}
	})
	if err := b.NotifyAsync(k1); err != nil {
		t.Fatal(err)
	}
	<-q.entered // its publish is in flight, held

	type result struct {
		err       error
		succeeded int64
	}
	flushed := make(chan result, 1)
	watch := &doneWatch{Context: ctx, called: make(chan struct{})}
	go func() {
		err := b.FlushNotifications(watch)
		flushed <- result{err, q.succeeded.Load()}
	}()
	<-watch.called // the flush waits for the first queueing

	if err := b.NotifyAsync(k1); err != nil { // queued again
		t.Fatal(err)
	}
	close(q.hold) // the publish in flight fails
	<-failed
	r := <-flushed
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.succeeded == 0 {
		t.Fatal("FlushNotifications returned nil before any publish of the key succeeded")
	}
	if st := b.Stats(); st.Pending != 0 || st.NotifyErrors != 1 {
		t.Errorf("stats %+v, want none pending after 1 error", st)
	}
	if n := q.calls.Load(); n != 2 {
		t.Errorf("%d publishes, want 2: the failed one, and one retry covering both queueings", n)
	}
}
