package entitysync_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// probe GETs a health endpoint and returns its status and body.
func probe(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", url, err)
	}
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// awaitProbe polls url until it answers status with a body containing
// want.
func awaitProbe(t *testing.T, url string, status int, want string) {
	t.Helper()
	testkit.AwaitCond(t, wait, func() (bool, string) {
		code, body := probe(t, url)
		return code == status && strings.Contains(body, want), "got " + http.StatusText(code) + ": " + body
	})
}

func serveProbes(t *testing.T, e *es.EntitySync) (ready, live string, srv *httptest.Server) {
	e.Mux.Handle("/readyz", e.ReadinessHandler())
	e.Mux.Handle("/healthz", e.LivenessHandler())
	srv = httptest.NewServer(e.Mux)
	t.Cleanup(srv.Close)
	return srv.URL + "/readyz", srv.URL + "/healthz", srv
}

// Readiness follows the broker: a real nsqd stopped makes the server not
// ready (it would not hear changes made through other servers), started
// again makes it ready, and a change notified then reaches its client.
func TestReadinessFollowsTheNSQConnection(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	store := testkit.NewStore()
	e, err := es.New(es.Config{
		NSQAddr: nsqd.TCPAddr(),
		NSQ:     esq.NSQConfig{ReconnectInterval: 200 * time.Millisecond},
		Logger:  testkit.SilentLogger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	ready, live, srv := serveProbes(t, e)
	closed := false
	t.Cleanup(func() {
		if !closed {
			_ = e.Close(context.Background())
		}
	})

	if code, body := probe(t, ready); code != http.StatusServiceUnavailable || !strings.Contains(body, "no entity type registered") {
		t.Errorf("before Register: %d %q, want 503 saying no entity type is registered", code, body)
	}
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	if code, body := probe(t, ready); code != http.StatusOK || body != "ready" {
		t.Fatalf("after Register: %d %q, want 200 ready", code, body)
	}
	ws := testkit.Dial(t, srv)
	ws.Subscribe("items", "1")
	ws.Await(wait, "items/1 v0", testkit.Is("items", "1", 0))

	nsqd.Stop()
	awaitProbe(t, ready, http.StatusServiceUnavailable, "no nsqd connection for topic items")
	if code, body := probe(t, live); code != http.StatusOK || body != "ok" {
		t.Errorf("liveness with the broker down: %d %q, want 200 ok", code, body)
	}
	if err := nsqd.Start(); err != nil {
		t.Fatal(err)
	}
	awaitProbe(t, ready, http.StatusOK, "ready")
	key := shared.EntityKey{Entity: "items", ID: "1"}
	v := store.Bump(key)
	testkit.AwaitCond(t, wait, func() (bool, string) { // the producer may still be redialling
		err := e.NotifyAllOfChange(key)
		return err == nil, "notify: " + errString(err)
	})
	ws.Await(wait, "items/1 after the restart", testkit.Is("items", "1", v))

	closed = true
	if err := e.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if code, body := probe(t, ready); code != http.StatusServiceUnavailable || body != "not ready: shutting down" {
		t.Errorf("after Close: %d %q, want 503 not ready: shutting down", code, body)
	}
}

func errString(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}

// A configuration Setup cannot use fails both probes: liveness too, so an
// orchestrator restarts the process and shows the crash loop instead of a
// server that silently serves nothing.
func TestProbesOfAFailedSetup(t *testing.T) {
	e := es.Setup(es.Config{NSQAddr: "127.0.0.1:4150", NSQ: esq.NSQConfig{MaxInFlight: -1}, Logger: testkit.SilentLogger()})
	if e.Err() == nil {
		t.Fatal("Setup accepted a negative MaxInFlight")
	}
	mux := http.NewServeMux() // a failed Setup may have no router of its own
	mux.Handle("/readyz", e.ReadinessHandler())
	mux.Handle("/healthz", e.LivenessHandler())
	srv := httptest.NewServer(mux)
	defer srv.Close()
	for _, path := range []string{"/readyz", "/healthz"} {
		code, body := probe(t, srv.URL+path)
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "MaxInFlight") {
			t.Errorf("%s: %d %q, want 503 naming the bad setting", path, code, body)
		}
	}
}

// With the in-process queue, readiness is about registration and Close
// only.
func ExampleEntitySync_ReadinessHandler() {
	e, err := es.New(es.Config{})
	if err != nil {
		panic(err)
	}
	e.Mux.Handle("/healthz", e.LivenessHandler())
	e.Mux.Handle("/readyz", e.ReadinessHandler())
	srv := httptest.NewServer(e.Mux)
	defer srv.Close()
	show := func() {
		resp, err := http.Get(srv.URL + "/readyz")
		if err != nil {
			panic(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Print(resp.StatusCode, " ", string(b))
	}
	show()
	_ = e.Register("items", func(context.Context, shared.EntityKey) ([][]byte, error) { return nil, nil })
	show()
	_ = e.Close(context.Background())
	show()
	// Output:
	// 503 not ready: no entity type registered yet
	// 200 ready
	// 503 not ready: shutting down
}
