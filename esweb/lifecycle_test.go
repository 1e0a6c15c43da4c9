package esweb_test

// Regression tests for the connection's life (review findings): a
// connection is reachable only once its client exists, hook contexts end with
// the connection, Close is bounded, envelope clients get heartbeats, and the
// default limits never refuse a page that subscribes to many keys at once.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esweb"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// bridgeServer serves "items" (one row per key: its id) through a Server
// built with opts and the client builder wrap makes of the bridge's.
func bridgeServer(t *testing.T, opts esweb.Options, wrap func(esweb.ClientBuilder) esweb.ClientBuilder) (*esweb.Server, *httptest.Server) {
	t.Helper()
	hub := esdb.NewDatabaseHub()
	if err := hub.Register("items", func(_ context.Context, k shared.EntityKey) ([][]byte, error) {
		b, _ := json.Marshal(map[string]string{"id": k.ID})
		return [][]byte{b}, nil
	}); err != nil {
		t.Fatal(err)
	}
	bridge := esbridge.New(esq.NewMemory(), hub, esbridge.Options{Logger: testkit.Logger()})
	if err := bridge.ServeEntity("items"); err != nil {
		t.Fatal(err)
	}
	build := esweb.ClientBuilder(bridge.ClientBuilder)
	if wrap != nil {
		build = wrap(build)
	}
	opts.Logger = testkit.Logger()
	s := esweb.NewServer(build, opts)
	srv := httptest.NewServer(s)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		_ = s.Close(ctx)
		srv.Close()
		_ = bridge.Close(ctx)
	})
	return s, srv
}

// The review's crash: the heartbeat loop reached a connection registered
// before its bridge client was built.
func TestHeartbeatNeverReachesAConnectionWithoutItsClient(t *testing.T) {
	gate := make(chan struct{})
	building := make(chan struct{}, 1)
	_, srv := bridgeServer(t, esweb.Options{HeartbeatInterval: 5 * time.Millisecond}, func(build esweb.ClientBuilder) esweb.ClientBuilder {
		first := true
		return func(ctx context.Context) *esbridge.Client {
			if !first {
				building <- struct{}{}
				<-gate // a slow builder: an app's lookup of the user, say
			}
			first = false
			return build(ctx)
		}
	})
	// One connection keeps the heartbeat loop running.
	beating, next := dialEnvelope(t, srv.URL)
	_ = beating
	next() // welcome
	go func() {
		c, _, err := websocket.DefaultDialer.Dial(wsURL(srv.URL), nil)
		if err == nil {
			c.Close()
		}
	}()
	<-building
	// Several beats while the second connection's client is being built.
	for i := 0; i < 5; i++ {
		if f := next(); f.Type != "heartbeat" {
			t.Fatalf("got %+v, want a heartbeat", f)
		}
	}
	close(gate)
}

func TestWelcomeAnnouncesHeartbeats(t *testing.T) {
	_, srv := bridgeServer(t, esweb.Options{HeartbeatInterval: 20 * time.Millisecond}, nil)
	d := websocket.Dialer{Subprotocols: []string{shared.Subprotocol}}
	c, _, err := d.Dial(wsURL(srv.URL), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var welcome struct {
		Type        string `json:"type"`
		HeartbeatMs int64  `json:"heartbeatMs"`
	}
	if err := c.ReadJSON(&welcome); err != nil || welcome.Type != "welcome" || welcome.HeartbeatMs != 20 {
		t.Fatalf("welcome %+v (%v), want heartbeatMs 20", welcome, err)
	}
}

func TestHookContextEndsWithTheConnection(t *testing.T) {
	ctxs := make(chan context.Context, 1)
	e, srv := testkit.Serve(t, es.Config{Bridge: esbridge.Options{Authorize: func(ctx context.Context, _ shared.EntityKey) error {
		ctxs <- ctx
		return nil
	}}})
	if err := e.Register("items", testkit.NewStore().Fetch); err != nil {
		t.Fatal(err)
	}
	ws := testkit.Dial(t, srv)
	ws.Subscribe("items", "1")
	var ctx context.Context
	select {
	case ctx = <-ctxs:
	case <-time.After(wait):
		t.Fatal("Authorize not called")
	}
	if ctx.Err() != nil {
		t.Fatal("hook context already done while the connection is open")
	}
	ws.Conn.Close()
	select {
	case <-ctx.Done():
	case <-time.After(wait):
		t.Fatal("hook context not cancelled when the connection ended")
	}
}

func TestCloseIsBoundedByItsContext(t *testing.T) {
	stuck := make(chan struct{})
	entered := make(chan struct{})
	e, srv := testkit.Serve(t, es.Config{Bridge: esbridge.Options{Authorize: func(context.Context, shared.EntityKey) error {
		close(entered)
		<-stuck // a hook that ignores its context
		return nil
	}}})
	defer close(stuck)
	if err := e.Register("items", testkit.NewStore().Fetch); err != nil {
		t.Fatal(err)
	}
	ws := testkit.Dial(t, srv)
	ws.Subscribe("items", "1")
	<-entered
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := e.Web.Close(ctx); err == nil {
		t.Error("Close reported success with a connection stuck in a hook")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Close took %v with a 100ms context", d)
	}
}

// The review's kick loop: a client that subscribes to many keys at once
// while reading normally was closed for "too many unread control frames",
// and a raw client lost every subscribe past the rate limit's burst. With
// the default limits, 1,000 keys at once all arrive, in both dialects.
func TestThousandSubscribesAtOnceAllArrive(t *testing.T) {
	const keys = 1000
	_, srv := bridgeServer(t, esweb.Options{}, nil)
	for _, dialect := range []string{"raw", "envelope"} {
		t.Run(dialect, func(t *testing.T) {
			d := websocket.Dialer{}
			if dialect == "envelope" {
				d.Subprotocols = []string{shared.Subprotocol}
			}
			c, _, err := d.Dial(wsURL(srv.URL), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			go func() { // write while the test reads, as a page does
				for i := 0; i < keys; i++ {
					req := map[string]any{"action": "subscribe", "ref": fmt.Sprint(i), "body": map[string]string{"entity": "items", "id": fmt.Sprint(i)}}
					if c.WriteJSON(req) != nil {
						return
					}
				}
			}()
			got, acks := map[string]bool{}, 0
			_ = c.SetReadDeadline(time.Now().Add(wait))
			for len(got) < keys || dialect == "envelope" && acks < keys {
				var f struct {
					Type string `json:"type"`
					ID   string `json:"id"` // raw: the row itself
					Key  struct {
						ID string `json:"id"`
					} `json:"key"`
					Code string `json:"code"`
				}
				if err := c.ReadJSON(&f); err != nil {
					t.Fatalf("after %d states and %d acks: %v", len(got), acks, err)
				}
				switch f.Type {
				case "":
					got[f.ID] = true
				case "rows":
					got[f.Key.ID] = true
				case "ack":
					acks++
				case "welcome", "heartbeat":
				default:
					t.Fatalf("unexpected %s frame (%s)", f.Type, f.Code)
				}
			}
		})
	}
}
