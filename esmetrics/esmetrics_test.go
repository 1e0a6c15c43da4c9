package esmetrics_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esmetrics"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esweb"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

const wait = 10 * time.Second

// families is every metric family esmetrics exports (docs/operations.md
// lists them): a family missing from a scrape, or one not listed here,
// fails the test.
var families = []string{
	"entitysync_connections",
	"entitysync_connections_accepted_total",
	"entitysync_connections_closed_by_server_total",
	"entitysync_connections_refused_total",
	"entitysync_deliveries_total",
	"entitysync_fanout_duration_seconds",
	"entitysync_fetch_duration_seconds",
	"entitysync_fetch_errors_total",
	"entitysync_fetches_total",
	"entitysync_keys",
	"entitysync_notification_latency_seconds",
	"entitysync_notifications_pending",
	"entitysync_notifications_published_total",
	"entitysync_notifications_received_total",
	"entitysync_notify_errors_total",
	"entitysync_pending_bytes",
	"entitysync_queue_losses_total",
	"entitysync_ready",
	"entitysync_requests_rate_limited_total",
	"entitysync_resync_keys_total",
	"entitysync_revocations_total",
	"entitysync_slow_clients_dropped_total",
	"entitysync_subscribes_refused_total",
	"entitysync_subscriptions",
	"entitysync_updates_coalesced_total",
}

// scrape reads the registry as Prometheus would, through /metrics.
type scrape map[string]*dto.MetricFamily

func gather(t *testing.T, reg *prometheus.Registry) scrape {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	out := scrape{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

// value returns the sample of name whose labels are labelPairs (name,
// value, ...): a counter's or gauge's value, a histogram's count.
func (s scrape) value(name string, labelPairs ...string) float64 {
	mf := s[name]
	if mf == nil {
		return -1
	}
next:
	for _, m := range mf.GetMetric() {
		for i := 0; i+1 < len(labelPairs); i += 2 {
			found := false
			for _, lp := range m.GetLabel() {
				if lp.GetName() == labelPairs[i] && lp.GetValue() == labelPairs[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	return -1
}

// awaitMetric polls the registry until cond holds for name's sample.
func awaitMetric(t *testing.T, reg *prometheus.Registry, what string, cond func(float64) bool, name string, labelPairs ...string) {
	t.Helper()
	testkit.AwaitCond(t, wait, func() (bool, string) {
		v := gather(t, reg).value(name, labelPairs...)
		return cond(v), fmt.Sprintf("%s%v = %v, want %s", name, labelPairs, v, what)
	})
}

func atLeast(n float64) func(float64) bool { return func(v float64) bool { return v >= n } }
func equal(n float64) func(float64) bool   { return func(v float64) bool { return v == n } }

// A real server on a real nsqd, real websocket clients: every family moves
// the way the traffic says, the user's own round hook still runs, and
// promlint finds nothing to say about the scrape.
func TestMetricsFollowRealTraffic(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	store := testkit.NewStore()
	var bigVersion atomic.Int64
	bigRow := func(_ context.Context, key shared.EntityKey) ([][]byte, error) {
		return [][]byte{fmt.Appendf(nil, `{"id":%q,"v":%d,"pad":%q}`, key.ID, bigVersion.Load(), strings.Repeat("x", 64<<10))}, nil
	}
	userRounds := make(chan esbridge.Round, 1024)
	cfg := entitysync.Config{
		NSQAddr: nsqd.TCPAddr(),
		NSQ:     esq.NSQConfig{ReconnectInterval: 200 * time.Millisecond},
		// Small send buffers: a client that stops reading fills its
		// socket after a few KiB instead of the megabytes loopback
		// autotuning allows.
		Web: esweb.Options{MaxConnections: 4, MaxSubscriptions: 3, WriteWait: 2 * time.Second, SendBufferSize: 16 << 10},
		Bridge: esbridge.Options{
			Authorize: func(_ context.Context, key shared.EntityKey) error {
				if key.ID == "forbidden" {
					return errors.New("not for you")
				}
				return nil
			},
			OnRound: func(r esbridge.Round) { // the application's own hook: Instrument keeps it
				select {
				case userRounds <- r:
				default:
				}
			},
		},
		Logger: testkit.SilentLogger(),
	}
	m := esmetrics.Instrument(&cfg)
	e, err := entitysync.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	if err := m.Register(reg, e); err != nil {
		t.Fatal(err)
	}
	if err := m.Register(reg, e); err == nil {
		t.Error("registering the same metrics twice succeeded")
	}
	e.Mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := httptest.NewServer(e.Mux)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		if err := e.Close(ctx); err != nil {
			t.Errorf("close: %v", err)
		}
		srv.Close()
	})

	if v := gather(t, reg).value("entitysync_ready"); v != 0 {
		t.Errorf("entitysync_ready before Register = %v, want 0", v)
	}
	for entity, fetch := range map[shared.EntityType]func(context.Context, shared.EntityKey) ([][]byte, error){
		"items":  store.Fetch,
		"big":    bigRow,
		"broken": func(context.Context, shared.EntityKey) ([][]byte, error) { return nil, errors.New("database down") },
	} {
		if err := e.Register(entity, fetch); err != nil {
			t.Fatal(err)
		}
	}

	// Two clients, three subscriptions, changes to one key.
	k1 := shared.EntityKey{Entity: "items", ID: "1"}
	a, b := testkit.Dial(t, srv), testkit.Dial(t, srv)
	a.Subscribe("items", "1")
	a.Subscribe("items", "2")
	b.Subscribe("items", "1")
	a.AwaitKeys(wait, k1, shared.EntityKey{Entity: "items", ID: "2"})
	b.AwaitKeys(wait, k1)
	const changes = 5
	for range changes {
		store.Bump(k1)
		if err := e.NotifyAllOfChange(k1); err != nil {
			t.Fatal(err)
		}
	}
	a.Await(wait, "items/1 at its last version", testkit.Is("items", "1", changes))
	b.Await(wait, "items/1 at its last version", testkit.Is("items", "1", changes))
	s := gather(t, reg)
	for _, c := range []struct {
		name string
		want float64
	}{
		{"entitysync_ready", 1},
		{"entitysync_connections", 2},
		{"entitysync_connections_accepted_total", 2},
		{"entitysync_subscriptions", 3},
		{"entitysync_keys", 2},
		{"entitysync_notifications_published_total", changes},
		{"entitysync_pending_bytes", 0},
	} {
		if v := s.value(c.name); v != c.want {
			t.Errorf("%s = %v, want %v", c.name, v, c.want)
		}
	}
	for _, name := range []string{"entitysync_notifications_received_total", "entitysync_fetches_total",
		"entitysync_fetch_duration_seconds", "entitysync_fanout_duration_seconds", "entitysync_notification_latency_seconds"} {
		if v := s.value(name); v < 1 {
			t.Errorf("%s = %v after %d changes, want at least 1", name, v, changes)
		}
	}
	// 3 initial states and at least one state of each change... to each of
	// the two subscribers of items/1 (latest-wins may skip some).
	if v := s.value("entitysync_deliveries_total"); v < 3+2 {
		t.Errorf("entitysync_deliveries_total = %v, want at least 5", v)
	}
	select {
	case <-userRounds:
	default:
		t.Error("the application's own OnRound hook was not called")
	}

	// Refusals: a subscription Authorize refuses, one past
	// MaxSubscriptions, a fetch that fails, an origin, a full server.
	c := testkit.Dial(t, srv)
	c.Subscribe("items", "forbidden")
	for _, id := range []string{"1", "2", "3", "4"} {
		c.Subscribe("items", id)
	}
	a.Subscribe("broken", "1")
	awaitMetric(t, reg, "1", equal(1), "entitysync_subscribes_refused_total", "reason", "forbidden")
	awaitMetric(t, reg, "1", equal(1), "entitysync_subscribes_refused_total", "reason", "limit")
	awaitMetric(t, reg, "at least 1", atLeast(1), "entitysync_fetch_errors_total")
	url := testkit.WSURL(srv)
	if _, _, err := websocket.DefaultDialer.Dial(url, http.Header{"Origin": {"https://elsewhere.example"}}); err == nil {
		t.Error("a cross-origin upgrade was accepted")
	}
	d := testkit.Dial(t, srv) // the fourth connection: MaxConnections
	if _, _, err := websocket.DefaultDialer.Dial(url, nil); err == nil {
		t.Error("a fifth connection was accepted with MaxConnections 4")
	}
	s = gather(t, reg)
	for reason, want := range map[string]float64{"origin": 1, "full": 1, "auth": 0} {
		if v := s.value("entitysync_connections_refused_total", "reason", reason); v != want {
			t.Errorf("entitysync_connections_refused_total{reason=%q} = %v, want %v", reason, v, want)
		}
	}
	d.Conn.Close()
	awaitMetric(t, reg, "3", equal(3), "entitysync_connections")

	// A client that subscribes to a 64 KiB entity and stops reading: its
	// updates wait (pending bytes), newer ones replace older ones
	// (coalesced), and after WriteWait it is dropped.
	dialer := websocket.Dialer{NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err == nil {
			_ = conn.(*net.TCPConn).SetReadBuffer(4 << 10)
		}
		return conn, err
	}}
	stuck, _, err := dialer.Dial(url, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Close()
	big := shared.EntityKey{Entity: "big", ID: "1"}
	if err := stuck.WriteJSON(map[string]any{"action": "subscribe", "body": big}); err != nil {
		t.Fatal(err)
	}
	awaitRound := func(key shared.EntityKey, notified bool) {
		t.Helper()
		timeout := time.After(wait)
		for {
			select {
			case r := <-userRounds:
				if r.Key == key && r.Notified.IsZero() != notified {
					return
				}
			case <-timeout:
				t.Fatalf("no round of %s (notified: %v)", key, notified)
			}
		}
	}
	awaitRound(big, false) // the initial state: it fills the socket
	for range 3 {          // one round each: the first waits, the next replace it
		bigVersion.Add(1)
		if err := e.NotifyAllOfChange(big); err != nil {
			t.Fatal(err)
		}
		awaitRound(big, true)
	}
	s = gather(t, reg)
	if v := s.value("entitysync_pending_bytes"); v < 64<<10 {
		t.Errorf("entitysync_pending_bytes = %v with a 64 KiB update waiting for the stuck client", v)
	}
	if v := s.value("entitysync_updates_coalesced_total"); v < 1 {
		t.Errorf("entitysync_updates_coalesced_total = %v after 3 updates for a client that reads nothing, want at least 1", v)
	}
	awaitMetric(t, reg, "1 (after WriteWait)", equal(1), "entitysync_slow_clients_dropped_total")
	awaitMetric(t, reg, "0 once the stuck client is gone", equal(0), "entitysync_pending_bytes")

	// The broker restarts: not ready meanwhile, then a loss, a resync of
	// every subscribed key, ready again.
	nsqd.Stop()
	awaitMetric(t, reg, "0 while nsqd is down", equal(0), "entitysync_ready")
	if err := nsqd.Start(); err != nil {
		t.Fatal(err)
	}
	awaitMetric(t, reg, "1 once nsqd is back", equal(1), "entitysync_ready")
	awaitMetric(t, reg, "at least 1", atLeast(1), "entitysync_queue_losses_total")
	awaitMetric(t, reg, "at least 3 (items/1, items/2, items/3)", atLeast(3), "entitysync_resync_keys_total")

	// What Prometheus scrapes: every family, and nothing promlint objects to.
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	problems, err := promlint.New(resp.Body).Lint()
	if err != nil {
		t.Fatalf("promlint: %v", err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	var got []string
	for name := range gather(t, reg) {
		got = append(got, name)
	}
	slices.Sort(got)
	if !slices.Equal(got, families) {
		t.Errorf("families scraped:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(families, "\n"))
	}
}
