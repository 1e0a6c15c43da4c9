package esq_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

const resyncWait = 15 * time.Second

// fastCfg reconnects and notices a reconnect quickly, so a broker restart
// costs the test a fraction of a second.
func fastCfg(nsqdAddrs ...string) esq.NSQConfig {
	return esq.NSQConfig{
		NSQDAddrs:         nsqdAddrs,
		ReconnectInterval: 200 * time.Millisecond,
		WatchInterval:     50 * time.Millisecond,
		Logger:            testkit.SilentLogger(),
	}
}

// recorder collects what a subscription delivers.
type recorder struct {
	msgs   chan string
	losses atomic.Int64
	lost   chan struct{} // one token per onLoss call
}

func newRecorder() *recorder {
	return &recorder{msgs: make(chan string, 1024), lost: make(chan struct{}, 64)}
}

func (r *recorder) onMessage(b []byte) { r.msgs <- string(b) }

func (r *recorder) onLoss() {
	r.losses.Add(1)
	select {
	case r.lost <- struct{}{}:
	default:
	}
}

func (r *recorder) awaitLoss(t *testing.T) {
	t.Helper()
	select {
	case <-r.lost:
	case <-time.After(resyncWait):
		t.Fatalf("onLoss not called within %s", resyncWait)
	}
}

// awaitMessage waits for body, skipping other messages (earlier ones may be
// delivered more than once after a reconnect).
func (r *recorder) awaitMessage(t *testing.T, body string) {
	t.Helper()
	deadline := time.After(resyncWait)
	for {
		select {
		case got := <-r.msgs:
			if got == body {
				return
			}
		case <-deadline:
			t.Fatalf("message %s not delivered within %s", body, resyncWait)
		}
	}
}

func newNSQ(t *testing.T, cfg esq.NSQConfig) *esq.NSQ {
	t.Helper()
	q, err := esq.NewNSQ(cfg)
	if err != nil {
		t.Fatalf("NewNSQ: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := q.Close(ctx); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return q
}

func publish(t *testing.T, q *esq.NSQ, body string) {
	t.Helper()
	if err := q.Publish(context.Background(), "items", []byte(body)); err != nil {
		t.Fatalf("publish %s: %v", body, err)
	}
}

func TestNSQOnLossAfterRestartAndLiveAgain(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	q := newNSQ(t, fastCfg(nsqd.TCPAddr()))
	rec := newRecorder()
	if err := q.Subscribe("items", rec.onMessage, rec.onLoss); err != nil {
		t.Fatal(err)
	}
	publish(t, q, `{"n":"before"}`)
	rec.awaitMessage(t, `{"n":"before"}`)
	if n := rec.losses.Load(); n != 0 {
		t.Fatalf("onLoss called %d times before any loss", n)
	}

	// Several restarts: each must be reported once, and leave the
	// subscription live.
	const restarts = 3
	for i := 1; i <= restarts; i++ {
		if err := nsqd.Restart(); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		rec.awaitLoss(t)
		t.Logf("restart %d: onLoss %s after nsqd was back", i, time.Since(start).Round(time.Millisecond))

		// onLoss promises the subscription is live again: the first publish
		// after it must succeed and be delivered, with no retry.
		body := fmt.Sprintf(`{"n":"after restart %d"}`, i)
		publish(t, q, body)
		rec.awaitMessage(t, body)
		if n := rec.losses.Load(); n != int64(i) {
			t.Errorf("onLoss called %d times for %d restarts", n, i)
		}
	}
}

func TestNSQLookupdDiscoversNewNSQD(t *testing.T) {
	lookupd := nsqtest.StartLookupd(t)
	nsqd1 := nsqtest.StartNSQD(t, lookupd.TCPAddr())
	cfg := fastCfg(nsqd1.TCPAddr())
	cfg.LookupdHTTPAddrs = []string{lookupd.HTTPAddr()}
	q := newNSQ(t, cfg)
	rec := newRecorder()
	if err := q.Subscribe("items", rec.onMessage, rec.onLoss); err != nil {
		t.Fatal(err)
	}
	publish(t, q, `{"via":"nsqd1"}`)
	rec.awaitMessage(t, `{"via":"nsqd1"}`)

	// A second nsqd joins and gets the topic (another server publishes to
	// its local nsqd). The consumer finds it at its next nsqlookupd poll.
	nsqd2 := nsqtest.StartNSQD(t, lookupd.TCPAddr())
	other := newNSQ(t, fastCfg(nsqd2.TCPAddr()))
	start := time.Now()
	if err := other.Publish(context.Background(), "items", []byte(`{"via":"nsqd2","n":1}`)); err != nil {
		t.Fatal(err)
	}
	rec.awaitLoss(t)
	t.Logf("new nsqd discovered and onLoss called after %s", time.Since(start).Round(time.Millisecond))
	// Published before this server had a channel there: the topic kept it
	// for the first channel, which is ours.
	rec.awaitMessage(t, `{"via":"nsqd2","n":1}`)
	if err := other.Publish(context.Background(), "items", []byte(`{"via":"nsqd2","n":2}`)); err != nil {
		t.Fatal(err)
	}
	rec.awaitMessage(t, `{"via":"nsqd2","n":2}`)
	// nsqd1 still delivers too.
	publish(t, q, `{"via":"nsqd1","n":2}`)
	rec.awaitMessage(t, `{"via":"nsqd1","n":2}`)
}

func TestNSQConfigValidation(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  esq.NSQConfig
		want string
	}{
		{"no nsqd", esq.NSQConfig{}, "NSQDAddrs"},
		{"lookupd only", esq.NSQConfig{LookupdHTTPAddrs: []string{"127.0.0.1:4161"}}, "NSQDAddrs"},
		{"reconnect under twice watch", esq.NSQConfig{NSQDAddrs: []string{"127.0.0.1:4150"}, ReconnectInterval: 150 * time.Millisecond, WatchInterval: 100 * time.Millisecond}, "ReconnectInterval"},
		{"default reconnect under twice watch", esq.NSQConfig{NSQDAddrs: []string{"127.0.0.1:4150"}, WatchInterval: 3 * time.Second}, "ReconnectInterval"},
		{"prefix with space", esq.NSQConfig{NSQDAddrs: []string{"127.0.0.1:4150"}, TopicPrefix: "my app."}, "TopicPrefix"},
		{"prefix with slash", esq.NSQConfig{NSQDAddrs: []string{"127.0.0.1:4150"}, TopicPrefix: "a/b"}, "TopicPrefix"},
		{"prefix with hash", esq.NSQConfig{NSQDAddrs: []string{"127.0.0.1:4150"}, TopicPrefix: "a#"}, "TopicPrefix"},
		{"negative in-flight", esq.NSQConfig{NSQDAddrs: []string{"127.0.0.1:4150"}, MaxInFlight: -1}, "MaxInFlight"},
		{"negative live timeout", esq.NSQConfig{NSQDAddrs: []string{"127.0.0.1:4150"}, LiveTimeout: -time.Second}, "LiveTimeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q, err := esq.NewNSQ(tc.cfg)
			if err == nil {
				q.Close(context.Background())
				t.Fatalf("NewNSQ accepted %+v", tc.cfg)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not name %s", err, tc.want)
			}
		})
	}
	// The limits themselves are accepted, and nothing connects until used.
	for _, cfg := range []esq.NSQConfig{
		{NSQDAddrs: []string{"127.0.0.1:1"}},
		{NSQDAddrs: []string{"127.0.0.1:1"}, ReconnectInterval: 200 * time.Millisecond, WatchInterval: 100 * time.Millisecond},
		{NSQDAddrs: []string{"127.0.0.1:1"}, TopicPrefix: "my-app_1.v2."},
	} {
		q, err := esq.NewNSQ(cfg)
		if err != nil {
			t.Errorf("NewNSQ(%+v): %v", cfg, err)
			continue
		}
		q.Close(context.Background())
	}
}

func TestTopicNameRules(t *testing.T) {
	for _, tc := range []struct {
		prefix string
		entity shared.EntityType
		want   string // "" for invalid
	}{
		{"", "items", "items"},
		{"app.", "items", "app.items"},
		{"", "a.b_c-D9", "a.b_c-D9"},
		{"", shared.EntityType(strings.Repeat("x", 64)), strings.Repeat("x", 64)},
		{"p.", shared.EntityType(strings.Repeat("x", 62)), "p." + strings.Repeat("x", 62)},
		{"", shared.EntityType(strings.Repeat("x", 65)), ""},
		{"p.", shared.EntityType(strings.Repeat("x", 63)), ""}, // 65 with the prefix
		{"", "", ""},
		{"", "has space", ""},
		{"", "slash/y", ""},
		{"", "colon:y", ""},
		{"", "items#ephemeral", ""}, // an ephemeral topic would lose messages
		{"", "ünïcode", ""},
		{"", "tab\t", ""},
	} {
		got, err := esq.TopicName(tc.prefix, tc.entity)
		switch {
		case tc.want == "" && err == nil:
			t.Errorf("TopicName(%q, %q) = %q, want an error", tc.prefix, tc.entity, got)
		case tc.want == "" && !strings.Contains(err.Error(), "not valid"):
			t.Errorf("TopicName(%q, %q) error %q does not say why", tc.prefix, tc.entity, err)
		case tc.want != "" && err != nil:
			t.Errorf("TopicName(%q, %q): %v", tc.prefix, tc.entity, err)
		case tc.want != "" && got != tc.want:
			t.Errorf("TopicName(%q, %q) = %q, want %q", tc.prefix, tc.entity, got, tc.want)
		}
	}

	// Publish and Subscribe apply the same rules, before touching nsqd.
	q, err := esq.NewNSQ(esq.NSQConfig{NSQDAddrs: []string{"127.0.0.1:1"}, TopicPrefix: "p.", Logger: testkit.SilentLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close(context.Background())
	long := shared.EntityType(strings.Repeat("x", 63))
	if err := q.Publish(context.Background(), long, []byte("{}")); err == nil || !strings.Contains(err.Error(), "not valid") {
		t.Errorf("Publish to a 65-character topic: %v", err)
	}
	if err := q.Subscribe(long, func([]byte) {}, nil); err == nil || !strings.Contains(err.Error(), "not valid") {
		t.Errorf("Subscribe to a 65-character topic: %v", err)
	}
}

func TestNSQCloseReleasesEverything(t *testing.T) {
	lookupd := nsqtest.StartLookupd(t)
	nsqd := nsqtest.StartNSQD(t, lookupd.TCPAddr())
	direct := nsqtest.StartNSQD(t)

	for _, tc := range []struct {
		name     string
		cfg      esq.NSQConfig
		httpAddr string
	}{
		{"direct", fastCfg(direct.TCPAddr()), direct.HTTPAddr()},
		{"lookupd", func() esq.NSQConfig {
			c := fastCfg(nsqd.TCPAddr())
			c.LookupdHTTPAddrs = []string{lookupd.HTTPAddr()}
			return c
		}(), nsqd.HTTPAddr()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// nsqd asks nsqlookupd over HTTP for a new topic's channels and
			// keeps that connection open: create the topics first, so that
			// nsqd's own HTTP client goroutines are not counted as ours.
			for _, topic := range []string{"items", "users"} {
				createTopic(t, tc.httpAddr, topic)
			}
			before := len(testkit.Goroutines())
			q, err := esq.NewNSQ(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			rec := newRecorder()
			for _, entity := range []shared.EntityType{"items", "users"} {
				if err := q.Subscribe(entity, rec.onMessage, rec.onLoss); err != nil {
					t.Fatal(err)
				}
			}
			for i := 0; i < 3; i++ {
				body := fmt.Sprintf(`{"i":%d}`, i)
				publish(t, q, body)
				rec.awaitMessage(t, body)
			}

			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := q.Close(ctx); err != nil {
				t.Fatal(err)
			}
			if err := q.Close(ctx); err != nil {
				t.Errorf("second Close: %v", err)
			}
			if err := q.Publish(ctx, "items", []byte("{}")); !errors.Is(err, esq.ErrClosed) {
				t.Errorf("Publish after Close: %v, want ErrClosed", err)
			}
			// Consumers, producers, watchers and the nsqlookupd HTTP client's
			// connections are all gone (the brokers' own goroutines are not
			// counted).
			testkit.AwaitGoroutines(t, before, 10*time.Second)
		})
	}
}

// A refused Subscribe (the entity type is already subscribed, or the queue
// is closed) must not leave the consumer it prepared running.
func TestNSQRefusedSubscribeLeavesNoGoroutine(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	q := newNSQ(t, fastCfg(nsqd.TCPAddr()))
	rec := newRecorder()
	if err := q.Subscribe("items", rec.onMessage, rec.onLoss); err != nil {
		t.Fatal(err)
	}
	before := len(testkit.Goroutines())
	for i := 0; i < 3; i++ {
		if err := q.Subscribe("items", rec.onMessage, nil); !errors.Is(err, esq.ErrAlreadySubscribed) {
			t.Fatalf("second Subscribe to items: %v, want ErrAlreadySubscribed", err)
		}
	}
	testkit.AwaitGoroutines(t, before, 5*time.Second)

	closed := newNSQ(t, fastCfg(nsqd.TCPAddr()))
	if err := closed.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	before = len(testkit.Goroutines())
	if err := closed.Subscribe("orders", rec.onMessage, nil); !errors.Is(err, esq.ErrClosed) {
		t.Fatalf("Subscribe after Close: %v, want ErrClosed", err)
	}
	testkit.AwaitGoroutines(t, before, 5*time.Second)
}

// createTopic creates topic on an nsqd through its HTTP API.
func createTopic(t *testing.T, nsqdHTTPAddr, topic string) {
	t.Helper()
	resp, err := http.Post("http://"+nsqdHTTPAddr+"/topic/create?topic="+topic, "text/plain", nil)
	if err != nil {
		t.Fatalf("create topic %s: %v", topic, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("create topic %s: %s", topic, resp.Status)
	}
}
