package esclient_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esclient"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// TestSubscribeGetsStateAndChanges: the initial state arrives on
// subscribe, then every change; two keys are independent.
func TestSubscribeGetsStateAndChanges(t *testing.T) {
	store := testkit.NewStore()
	e, url := server(t, store, entitysync.Config{})
	c := dial(t, url, esclient.Options{})
	if c.State() != esclient.Connected {
		t.Fatalf("state after Dial = %v", c.State())
	}

	k1, k2 := key("items", "1"), key("items", "2")
	r1, r2 := newRecorder(t), newRecorder(t)
	r1.subscribe(c, k1)
	r2.subscribe(c, k2)
	if row := r1.row(); row.Key() != k1 || row.Version != 0 {
		t.Fatalf("initial state of %s: %+v", k1, row)
	}
	if row := r2.row(); row.Key() != k2 || row.Version != 0 {
		t.Fatalf("initial state of %s: %+v", k2, row)
	}

	v := change(t, e, store, k1)
	if row := r1.await(v); row.Key() != k1 {
		t.Fatalf("change of %s: got %+v", k1, row)
	}
	v = change(t, e, store, k2)
	r2.await(v)
	r1.none()
}

// TestSeveralRowsInOneCallback: all rows of one change arrive in one Rows
// call.
func TestSeveralRowsInOneCallback(t *testing.T) {
	store := testkit.NewStore()
	store.Parts = 3
	_, url := server(t, store, entitysync.Config{})
	c := dial(t, url, esclient.Options{})
	r := newRecorder(t)
	r.subscribe(c, key("items", "1"))
	ev := r.next()
	if ev.kind != "rows" || len(ev.rows) != 3 {
		t.Fatalf("got %v, want three rows in one callback", ev)
	}
	for i, b := range ev.rows {
		if row := testkit.ParseRow(b); row.Part != i {
			t.Errorf("row %d is part %d", i, row.Part)
		}
	}
}

// TestDuplicateSubscriptionsShareOne: a second subscription to a key gets
// its state from the client (no second fetch), both get changes, and the
// server-side subscription ends only with the last one.
func TestDuplicateSubscriptionsShareOne(t *testing.T) {
	store := testkit.NewStore()
	e, url := server(t, store, entitysync.Config{})
	c := dial(t, url, esclient.Options{})
	k := key("items", "1")

	a, b := newRecorder(t), newRecorder(t)
	unsubA := a.subscribe(c, k)
	a.await(0)
	unsubB := b.subscribe(c, k)
	b.await(0)
	if n := store.FetchesOf(k); n != 1 {
		t.Fatalf("%s fetched %d times, want 1: the second subscription was sent to the server", k, n)
	}

	v := change(t, e, store, k)
	a.await(v)
	b.await(v)

	unsubA()
	unsubA() // twice is harmless
	v = change(t, e, store, k)
	b.await(v)
	a.none()

	unsubB()
	// Requests are processed in order: once the fence's state arrives, the
	// unsubscribe has been applied on the server.
	fence := newRecorder(t)
	fence.subscribe(c, key("items", "fence"))
	fence.await(0)
	// The key leaves the server's index once its last round has ended,
	// which may be just after the client got that round's frame.
	testkit.AwaitCond(t, wait, func() (bool, string) {
		keys := e.Bridge.Stats().Keys
		return keys == 1, fmt.Sprintf("server holds %d keys, want 1 (only the fence)", keys)
	})
	a.none()
	b.none()
}

// TestUnknownEntityIsReported: the server's unknown_entity refusal reaches
// the subscription's Error callback with its code and key, and the
// connection carries on.
func TestUnknownEntityIsReported(t *testing.T) {
	store := testkit.NewStore()
	_, url := server(t, store, entitysync.Config{})
	c := dial(t, url, esclient.Options{})

	bad := newRecorder(t)
	unsub := bad.subscribe(c, key("nope", "1"))
	ev := bad.next()
	if ev.kind != "error" {
		t.Fatalf("got %v, want an error", ev)
	}
	serr := asServerError(t, ev.err)
	if serr.Code != shared.CodeUnknownEntity || serr.Key != key("nope", "1") || serr.Action != "subscribe" {
		t.Fatalf("got %+v", serr)
	}
	unsub() // after the refusal: a no-op

	good := newRecorder(t)
	good.subscribe(c, key("items", "1"))
	good.await(0)
	bad.none()

	// Plain Subscribe reports through Options.OnError.
	errs := make(chan error, 1)
	c2 := dial(t, url, esclient.Options{OnError: func(err error) { errs <- err }})
	c2.Subscribe(key("nope", "2"), nil, nil)
	select {
	case err := <-errs:
		if serr := asServerError(t, err); serr.Code != shared.CodeUnknownEntity {
			t.Fatalf("got %v", serr)
		}
	case <-timeout():
		t.Fatal("no error reported")
	}
	if _, err := c2.SubscribeWith(key("", "1"), esclient.Handlers{}); err == nil {
		t.Fatal("an empty entity type was accepted")
	}
}

// TestSecretIsSentAndResentOnReconnect: the secret reaches the app's seed
// handler, SetSecret changes it, and it is sent again after a reconnect,
// before the subscriptions.
func TestSecretIsSentAndResentOnReconnect(t *testing.T) {
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, entitysync.Config{Logger: testkit.Logger()})
	if err := e.RegisterEntityAndDBHandler("docs", store.SeedHandler); err != nil {
		t.Fatal(err)
	}
	p := startProxy(t, srv.Listener.Addr().String())
	st := newStates(t)
	c := dial(t, "ws://"+p.Addr()+shared.WebsocketPath, fast(esclient.Options{Secret: "s1", OnState: st.onState}))
	k := key("docs", "1")
	r := newRecorder(t)
	r.subscribe(c, k)
	if row := r.row(); row.Secret != "s1" {
		t.Fatalf("initial row has secret %q, want s1", row.Secret)
	}
	c.SetSecret("s2")
	for row := r.row(); row.Secret != "s2"; row = r.row() {
		if row.Secret != "s1" {
			t.Fatalf("row has secret %q", row.Secret)
		}
	}

	p.SetDown(true)
	p.Cut()
	st.await(esclient.Disconnected)
	v := store.Bump(k) // made while the client is away
	p.SetDown(false)
	st.await(esclient.Connected)
	row := r.await(v)
	if row.Secret != "s2" {
		t.Fatalf("after reconnect the row has secret %q, want s2", row.Secret)
	}
}

// TestReconnectAfterCut cuts the connection under the client (no close
// frame, as a network failure), keeps the server unreachable while the key
// changes, and checks that the client reconnects, resubscribes every key and
// ends on the latest state; later changes keep coming.
func TestReconnectAfterCut(t *testing.T) {
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, entitysync.Config{Logger: testkit.Logger()})
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	p := startProxy(t, srv.Listener.Addr().String())
	st := newStates(t)
	c := dial(t, "ws://"+p.Addr()+shared.WebsocketPath, fast(esclient.Options{OnState: st.onState}))

	k1, k2 := key("items", "1"), key("items", "2")
	r1, r2 := newRecorder(t), newRecorder(t)
	r1.subscribe(c, k1)
	r2.subscribe(c, k2)
	r1.await(0)
	r2.await(0)
	r1.await(change(t, e, store, k1))

	p.SetDown(true)
	p.Cut()
	st.await(esclient.Disconnected)
	if c.State() == esclient.Connected {
		t.Fatal("state is Connected while the server is unreachable")
	}
	// Changed while the client is away: the notification finds no
	// subscriber, so only the resubscription can deliver it.
	v1 := change(t, e, store, k1)
	v2 := change(t, e, store, k2)
	st.await(esclient.Disconnected) // at least one attempt failed while down
	p.SetDown(false)
	st.await(esclient.Connected)
	r1.await(v1)
	r2.await(v2)

	r1.await(change(t, e, store, k1))
}

// TestReconnectAfterServerRestart closes the server (clients get close code
// 1001) and starts a new one on the same address; the client reconnects to
// it and gets the state changed in between.
func TestReconnectAfterServerRestart(t *testing.T) {
	store := testkit.NewStore()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	start := func(ln net.Listener) (stop func()) {
		e, err := entitysync.New(entitysync.Config{Logger: testkit.Logger()})
		if err != nil {
			t.Fatal(err)
		}
		if err := e.Register("items", store.Fetch); err != nil {
			t.Fatal(err)
		}
		hs := &http.Server{Handler: e.Mux}
		served := make(chan struct{})
		go func() { defer close(served); _ = hs.Serve(ln) }()
		return func() {
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			if err := e.Close(ctx); err != nil {
				t.Errorf("close: %v", err)
			}
			hs.Close()
			<-served
		}
	}
	stop := start(ln)
	st := newStates(t)
	c := dial(t, "ws://"+addr+shared.WebsocketPath, fast(esclient.Options{OnState: st.onState}))
	k := key("items", "1")
	r := newRecorder(t)
	r.subscribe(c, k)
	r.await(0)

	stop()
	st.await(esclient.Disconnected)
	v := store.Bump(k)

	ln2, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen again on %s: %v", addr, err)
	}
	stop2 := start(ln2)
	defer stop2()
	st.await(esclient.Connected)
	r.await(v)
}

// TestChangeOnOtherServerOverNSQ: two servers share an embedded nsqd; a
// change notified on server B reaches a client of server A.
func TestChangeOnOtherServerOverNSQ(t *testing.T) {
	if testing.Short() {
		t.Skip("starts an nsqd")
	}
	nsqd := nsqtest.StartNSQD(t)
	store := testkit.NewStore()
	_, urlA := server(t, store, entitysync.Config{NSQAddr: nsqd.TCPAddr()})
	b, _ := server(t, store, entitysync.Config{NSQAddr: nsqd.TCPAddr()})

	c := dial(t, urlA, esclient.Options{})
	k := key("items", "1")
	r := newRecorder(t)
	r.subscribe(c, k)
	r.await(0)
	for range 3 {
		r.await(change(t, b, store, k))
	}
}

// TestDialErrors: Dial reports an unreachable server and a server that does
// not speak the envelope protocol.
func TestDialErrors(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := esclient.Dial(ctx, "ws://"+addr+shared.WebsocketPath, esclient.Options{}); err == nil {
		t.Fatal("Dial to a closed port succeeded")
	}

	raw := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := (&websocket.Upgrader{}).Upgrade(w, r, nil) // no subprotocol
		if err != nil {
			return
		}
		ws.Close()
	}))
	defer raw.Close()
	if _, err := esclient.Dial(ctx, wsURL(raw.URL), esclient.Options{}); !errors.Is(err, esclient.ErrNotEnvelope) {
		t.Fatalf("Dial to a raw-only server: %v, want ErrNotEnvelope", err)
	}
	if _, err := esclient.New("ftp://x/", esclient.Options{}); err == nil {
		t.Fatal("New accepted an ftp URL")
	}
}

// TestCloseLeavesNoGoroutine: Close ends every goroutine of the client,
// whether connected or waiting to reconnect, and is idempotent.
func TestCloseLeavesNoGoroutine(t *testing.T) {
	store := testkit.NewStore()
	_, url := server(t, store, entitysync.Config{})
	base := len(testkit.Goroutines())

	c := dial(t, url, esclient.Options{})
	r := newRecorder(t)
	r.subscribe(c, key("items", "1"))
	r.await(0)
	c.Close()
	c.Close()
	if c.State() != esclient.Closed {
		t.Fatalf("state after Close = %v", c.State())
	}
	// The server's side of the connection ends asynchronously.
	testkit.AwaitGoroutines(t, base, wait)

	// A client that never reaches its server.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	st := newStates(t)
	c2, err := esclient.New("ws://"+addr+shared.WebsocketPath, fast(esclient.Options{OnState: st.onState}))
	if err != nil {
		t.Fatal(err)
	}
	c2.Subscribe(key("items", "1"), nil, nil)
	st.await(esclient.Disconnected)
	st.await(esclient.Disconnected) // and retried
	c2.Close()
	testkit.AwaitGoroutines(t, base, wait)

	// Close from a callback returns.
	closed := make(chan struct{})
	var c3 *esclient.Client
	ready := make(chan struct{})
	c3 = dial(t, url, esclient.Options{})
	c3.Subscribe(key("items", "1"), func([]json.RawMessage) {
		<-ready
		c3.Close()
		close(closed)
	}, nil)
	close(ready)
	select {
	case <-closed:
	case <-timeout():
		t.Fatal("Close from a callback did not return")
	}
	testkit.AwaitGoroutines(t, base, wait)
	if _, err := c3.SubscribeWith(key("items", "1"), esclient.Handlers{}); !errors.Is(err, esclient.ErrClosed) {
		t.Fatalf("SubscribeWith after Close: %v, want ErrClosed", err)
	}
}

// TestForbiddenAndRevokedByRealServer: the server's Authorize hook refuses
// a key (Error callback, code forbidden) and withdraws one the client held
// when its secret changes (Revoked callback); the revoked key is not sent
// again, while the others carry on.
func TestForbiddenAndRevokedByRealServer(t *testing.T) {
	store := testkit.NewStore()
	authorize := func(ctx context.Context, k shared.EntityKey) error {
		conn, _ := shared.ConnectionFrom(ctx)
		if strings.HasPrefix(k.ID, "private") && conn.Secret() != "admin" {
			return errors.New("admins only")
		}
		return nil
	}
	e, url := server(t, store, entitysync.Config{Bridge: esbridge.Options{Authorize: authorize}})
	c := dial(t, url, esclient.Options{Secret: "admin"})

	private, public := key("items", "private-1"), key("items", "public-1")
	rp, rpub := newRecorder(t), newRecorder(t)
	rp.subscribe(c, private)
	rpub.subscribe(c, public)
	rp.await(0)
	rpub.await(0)

	c.SetSecret("guest")
	if ev := rp.next(); ev.kind != "revoked" || ev.reason == "" {
		t.Fatalf("got %v, want revoked with a reason", ev)
	}
	change(t, e, store, private)
	rpub.await(change(t, e, store, public))
	rp.none()

	denied := newRecorder(t)
	denied.subscribe(c, key("items", "private-2"))
	ev := denied.next()
	if ev.kind != "error" {
		t.Fatalf("got %v, want an error", ev)
	}
	if serr := asServerError(t, ev.err); serr.Code != shared.CodeForbidden || serr.Key != key("items", "private-2") {
		t.Fatalf("got %+v", serr)
	}
	rp.none()
}

// TestNewConnectsInTheBackground: a client made by New may subscribe before
// it is connected; the subscription is sent once it is.
func TestNewConnectsInTheBackground(t *testing.T) {
	store := testkit.NewStore()
	e, url := server(t, store, entitysync.Config{})
	st := newStates(t)
	c, err := esclient.New(url, esclient.Options{OnState: st.onState})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	k := key("items", "1")
	r := newRecorder(t)
	r.subscribe(c, k)
	st.await(esclient.Connected)
	r.await(0)
	r.await(change(t, e, store, k))
}
