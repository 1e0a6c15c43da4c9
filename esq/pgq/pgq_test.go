package pgq_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esq/pgq"
	"github.com/entity-sync/entity-sync/internal/pgtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

const wait = 10 * time.Second

// newQueue returns a queue on channel, closed when the test ends.
func newQueue(t *testing.T, channel string, tune func(*pgq.Config)) *pgq.Queue {
	t.Helper()
	pgtest.Require(t)
	cfg := pgq.Config{ConnString: pgtest.DSN(), Channel: channel, Logger: testkit.Logger(),
		MinReconnectDelay: 20 * time.Millisecond, MaxReconnectDelay: 200 * time.Millisecond}
	if tune != nil {
		tune(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	q, err := pgq.New(ctx, cfg)
	if err != nil {
		t.Fatalf("pgq.New: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		if err := q.Close(ctx); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return q
}

// recorder is a subscription's callbacks, recorded on channels.
type recorder struct {
	msgs chan string
	loss chan struct{}
}

func subscribe(t *testing.T, q esq.Queue, entity shared.EntityType) *recorder {
	t.Helper()
	r := &recorder{msgs: make(chan string, 10000), loss: make(chan struct{}, 100)}
	if err := q.Subscribe(entity, func(b []byte) { r.msgs <- string(b) }, func() { r.loss <- struct{}{} }); err != nil {
		t.Fatalf("subscribe %s: %v", entity, err)
	}
	return r
}

// next returns the next message, failing the test after wait.
func (r *recorder) next(t *testing.T) string {
	t.Helper()
	select {
	case m := <-r.msgs:
		return m
	case <-time.After(wait):
		t.Fatal("no message within", wait)
		return ""
	}
}

// expect reads messages and fails unless they are want, in order.
func (r *recorder) expect(t *testing.T, want ...string) {
	t.Helper()
	for i, w := range want {
		if got := r.next(t); got != w {
			t.Fatalf("message %d: got %s, want %s", i, got, w)
		}
	}
}

// awaitLoss waits for an onLoss call.
func (r *recorder) awaitLoss(t *testing.T) {
	t.Helper()
	select {
	case <-r.loss:
	case <-time.After(wait):
		t.Fatal("onLoss not called within", wait)
	}
}

// noLoss fails if onLoss was called.
func (r *recorder) noLoss(t *testing.T) {
	t.Helper()
	select {
	case <-r.loss:
		t.Fatal("onLoss called")
	default:
	}
}

func keyJSON(entity, id string) string {
	return fmt.Sprintf(`{"entity":%q,"id":%q}`, entity, id)
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	t.Cleanup(cancel)
	return ctx
}

// Three servers on one channel: what any one publishes, every one receives,
// dispatched by entity type; a plain pg_notify from SQL reaches them too.
func TestBroadcastThreeServers(t *testing.T) {
	t.Parallel()
	ch := pgtest.Name(t, "es_chan_")
	var qs []*pgq.Queue
	var items, users []*recorder
	for i := 0; i < 3; i++ {
		q := newQueue(t, ch, nil)
		qs = append(qs, q)
		items = append(items, subscribe(t, q, "items"))
		users = append(users, subscribe(t, q, "users"))
	}
	// A queue on another channel hears nothing of this one.
	other := subscribe(t, newQueue(t, pgtest.Name(t, "es_chan_"), nil), "items")

	for i, q := range qs {
		if err := q.Publish(ctxT(t), "items", []byte(keyJSON("items", fmt.Sprint(i)))); err != nil {
			t.Fatal(err)
		}
		// A body without the key (DetectLoss's marks are such) travels too.
		if err := q.Publish(ctxT(t), "users", []byte(fmt.Sprintf(`{"_es":{"p":"x","n":%d}}`, i+1))); err != nil {
			t.Fatal(err)
		}
	}
	pgtest.Exec(t, pgtest.Pool(t), "SELECT pg_notify($1, $2)", ch, keyJSON("items", "sql"))
	for i := range qs {
		items[i].expect(t, keyJSON("items", "0"), keyJSON("items", "1"), keyJSON("items", "2"), keyJSON("items", "sql"))
		users[i].expect(t, `{"_es":{"p":"x","n":1}}`, `{"_es":{"p":"x","n":2}}`, `{"_es":{"p":"x","n":3}}`)
	}
	select {
	case m := <-other.msgs:
		t.Fatalf("a queue on another channel received %s", m)
	default:
	}
}

// Notify in the application's transaction: nothing on rollback, one
// notification per distinct key at commit. Postgres delivers notifications
// in commit order, so a sentinel sent after the transactions proves that
// nothing else came before it.
func TestNotifyInTransaction(t *testing.T) {
	t.Parallel()
	ch := pgtest.Name(t, "es_chan_")
	q := newQueue(t, ch, nil)
	r := subscribe(t, q, "items")
	pool := pgtest.Pool(t)
	ctx := ctxT(t)

	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := pgq.Notify(ctx, tx, ch, shared.EntityKey{Entity: "items", ID: "rolled-back"}); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}

	tx, err = pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a", "b", "a"} {
		if err := pgq.Notify(ctx, tx, q.Channel(), shared.EntityKey{Entity: "items", ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case m := <-r.msgs:
		t.Fatalf("received %s before commit", m)
	default:
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := pgq.Notify(ctx, pool, ch, shared.EntityKey{Entity: "items", ID: "sentinel"}); err != nil {
		t.Fatal(err)
	}
	// "a" twice in one transaction is delivered once.
	r.expect(t, keyJSON("items", "a"), keyJSON("items", "b"), keyJSON("items", "sentinel"))

	if err := pgq.Notify(ctx, pool, ch, shared.EntityKey{ID: "1"}); err == nil {
		t.Error("a key without an entity type was sent")
	}
	if err := pgq.Notify(ctx, pool, ch, shared.EntityKey{Entity: "items", ID: strings.Repeat("x", 8000)}); !errors.Is(err, pgq.ErrPayloadTooLarge) {
		t.Errorf("oversized key: %v, want ErrPayloadTooLarge", err)
	}
}

// A listener whose backend is terminated comes back by itself, calls onLoss
// once it listens again, and delivers again; publishing never depended on
// it.
func TestListenerTerminated(t *testing.T) {
	t.Parallel()
	ch := pgtest.Name(t, "es_chan_")
	q := newQueue(t, ch, nil)
	peer := newQueue(t, ch, nil)
	r := subscribe(t, q, "items")
	rp := subscribe(t, peer, "items")
	pool := pgtest.Pool(t)

	for round := 0; round < 2; round++ {
		pid := q.ListenerPID()
		if pid == 0 {
			t.Fatal("no listener pid")
		}
		pgtest.Terminate(t, pool, pid)
		r.awaitLoss(t)
		if now := q.ListenerPID(); now == 0 || now == pid {
			t.Fatalf("listener pid %d after onLoss (was %d)", now, pid)
		}
		id := fmt.Sprint("after-", round)
		if err := peer.Publish(ctxT(t), "items", []byte(keyJSON("items", id))); err != nil {
			t.Fatal(err)
		}
		r.expect(t, keyJSON("items", id))
		rp.expect(t, keyJSON("items", id))
		// The killed queue's publishes go through its pool.
		if err := q.Publish(ctxT(t), "items", []byte(keyJSON("items", id+"-q"))); err != nil {
			t.Fatal(err)
		}
		r.expect(t, keyJSON("items", id+"-q"))
		rp.expect(t, keyJSON("items", id+"-q"))
	}
	rp.noLoss(t)
	r.noLoss(t)
}

func TestPayloadLimit(t *testing.T) {
	t.Parallel()
	ch := pgtest.Name(t, "es_chan_")
	q := newQueue(t, ch, nil)
	r := subscribe(t, q, "items")
	prefix := `{"entity":"items","id":"`
	fit := prefix + strings.Repeat("x", pgq.MaxPayload-len(prefix)-2) + `"}`
	if err := q.Publish(ctxT(t), "items", []byte(fit)); err != nil {
		t.Fatalf("a payload of exactly %d bytes: %v", len(fit), err)
	}
	r.expect(t, fit)
	over := []byte(prefix + strings.Repeat("x", pgq.MaxPayload) + `"}`)
	err := q.Publish(ctxT(t), "items", over)
	if !errors.Is(err, pgq.ErrPayloadTooLarge) {
		t.Fatalf("a %d-byte payload: %v, want ErrPayloadTooLarge", len(over), err)
	}
	t.Log(err)
}

// Close releases the listener, the pool and every goroutine; the queue then
// refuses work.
func TestCloseLeavesNoGoroutine(t *testing.T) {
	pgtest.Require(t)
	pool := pgtest.Pool(t) // before the count: it lives until the test ends
	before := len(testkit.Goroutines())
	ch := pgtest.Name(t, "es_chan_")
	q, err := pgq.New(ctxT(t), pgq.Config{ConnString: pgtest.DSN(), Channel: ch, Logger: testkit.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	r := subscribe(t, q, "items")
	if err := q.Publish(ctxT(t), "items", []byte(keyJSON("items", "1"))); err != nil {
		t.Fatal(err)
	}
	r.expect(t, keyJSON("items", "1"))
	if err := q.Subscribe("items", func([]byte) {}, nil); !errors.Is(err, esq.ErrAlreadySubscribed) {
		t.Errorf("second subscribe: %v, want ErrAlreadySubscribed", err)
	}
	pid := q.ListenerPID()
	if err := q.Close(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	testkit.AwaitGoroutines(t, before, wait)
	if err := q.Publish(ctxT(t), "items", []byte(keyJSON("items", "2"))); !errors.Is(err, esq.ErrClosed) {
		t.Errorf("publish after close: %v, want ErrClosed", err)
	}
	if err := q.Subscribe("users", func([]byte) {}, nil); !errors.Is(err, esq.ErrClosed) {
		t.Errorf("subscribe after close: %v, want ErrClosed", err)
	}
	if err := q.Close(ctxT(t)); err != nil {
		t.Errorf("second close: %v", err)
	}
	// The listening backend is gone from the server too.
	testkit.AwaitCond(t, wait, func() (bool, string) {
		var n int
		if err := pool.QueryRow(ctxT(t), "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", int32(pid)).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n == 0, fmt.Sprintf("backend %d still there", pid)
	})
}

// A queue on the application's pool publishes through it and leaves it open.
func TestConfigPool(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t)
	ch := pgtest.Name(t, "es_chan_")
	q := newQueue(t, ch, func(c *pgq.Config) { c.ConnString, c.Pool = "", pool })
	r := subscribe(t, q, "items")
	if err := q.Publish(ctxT(t), "items", []byte(keyJSON("items", "1"))); err != nil {
		t.Fatal(err)
	}
	r.expect(t, keyJSON("items", "1"))
	if err := q.Close(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if err := pool.Ping(ctxT(t)); err != nil {
		t.Fatalf("the application's pool after Close: %v", err)
	}
}

func TestNewFails(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cfg  pgq.Config
	}{
		{"no connection", pgq.Config{}},
		{"channel too long", pgq.Config{ConnString: pgtest.DSN(), Channel: strings.Repeat("c", 64)}},
		{"bad connection string", pgq.Config{ConnString: "postgres://[::1"}},
		{"nobody there", pgq.Config{ConnString: "postgres://postgres@127.0.0.1:1/test?connect_timeout=2"}},
	} {
		start := time.Now()
		q, err := pgq.New(ctxT(t), tc.cfg)
		if err == nil {
			q.Close(context.Background())
			t.Errorf("%s: New succeeded", tc.name)
			continue
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("%s: New took %s to fail", tc.name, d)
		}
		t.Logf("%s: %v", tc.name, err)
	}
}

// The queue satisfies esq.Queue, also wrapped in DetectLoss as entitysync
// does: stamped keys and marks go through, and nothing is reported lost.
func TestDetectLossOverPostgres(t *testing.T) {
	t.Parallel()
	ch := pgtest.Name(t, "es_chan_")
	pub := esq.DetectLoss(newQueue(t, ch, nil), testkit.Logger())
	sub := esq.DetectLoss(newQueue(t, ch, nil), testkit.Logger())
	t.Cleanup(func() { pub.Close(context.Background()); sub.Close(context.Background()) })
	r := subscribe(t, sub, "items")
	for i := 0; i < 50; i++ {
		if err := pub.Publish(ctxT(t), "items", []byte(keyJSON("items", fmt.Sprint(i)))); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 50; i++ {
		if m := r.next(t); !strings.HasPrefix(m, strings.TrimSuffix(keyJSON("items", fmt.Sprint(i)), "}")+`,"_es":`) {
			t.Fatalf("message %d: %s", i, m)
		}
	}
	r.noLoss(t)
}
