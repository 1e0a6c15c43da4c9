package esclient_test

// Tests against a scripted server, for protocol situations a real server
// produces only in races or through features the test cannot trigger at
// will: out-of-order seq numbers, revocation, refusals, rate limiting.

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/esclient"
	"github.com/entity-sync/entity-sync/shared"
)

// fakeServer accepts envelope-protocol connections and hands each to the
// test, which reads the client's requests and writes frames itself.
type fakeServer struct {
	t     *testing.T
	url   string
	conns chan *fakeConn

	mu      sync.Mutex
	welcome map[string]any // sent first on every new connection
}

// setWelcome changes the welcome frame of later connections.
func (f *fakeServer) setWelcome(w map[string]any) {
	f.mu.Lock()
	f.welcome = w
	f.mu.Unlock()
}

type fakeConn struct {
	t    *testing.T
	ws   *websocket.Conn
	reqs chan request
	wmu  sync.Mutex
	at   time.Time // when the connection was accepted
}

// request is a client frame as the fake server reads it.
type request struct {
	Action string          `json:"action"`
	Body   json.RawMessage `json:"body"`
	Ref    string          `json:"ref"`
	at     time.Time       // when the server read it
}

func (r request) key() shared.EntityKey {
	var k shared.EntityKey
	_ = json.Unmarshal(r.Body, &k)
	return k
}

// defaultWelcome is the welcome frame of a scripted server: an old server's,
// without limits the client must pace by and without a heartbeat.
func defaultWelcome() map[string]any {
	return map[string]any{"type": "welcome", "protocol": shared.Subprotocol, "limits": map[string]any{"maxFrameBytes": 32768}}
}

func startFake(t *testing.T) *fakeServer {
	t.Helper()
	return startFakeWith(t, defaultWelcome())
}

// startFakeWith is startFake with the given welcome frame.
func startFakeWith(t *testing.T, welcome map[string]any) *fakeServer {
	t.Helper()
	f := &fakeServer{t: t, conns: make(chan *fakeConn, 64), welcome: welcome}
	var mu sync.Mutex
	var open []*websocket.Conn
	var handlers sync.WaitGroup
	up := websocket.Upgrader{Subprotocols: []string{shared.Subprotocol}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		handlers.Add(1)
		defer handlers.Done()
		mu.Lock()
		open = append(open, ws)
		mu.Unlock()
		fc := &fakeConn{t: t, ws: ws, reqs: make(chan request, 256), at: time.Now()}
		f.mu.Lock()
		welcome := f.welcome
		f.mu.Unlock()
		fc.send(welcome)
		f.conns <- fc
		defer close(fc.reqs)
		for {
			var req request
			if err := ws.ReadJSON(&req); err != nil {
				return
			}
			req.at = time.Now()
			fc.reqs <- req
		}
	}))
	t.Cleanup(func() {
		mu.Lock()
		for _, ws := range open {
			ws.Close()
		}
		mu.Unlock()
		handlers.Wait()
		srv.Close()
	})
	f.url = wsURL(srv.URL)
	return f
}

// accept returns the next connection.
func (f *fakeServer) accept() *fakeConn {
	f.t.Helper()
	select {
	case fc := <-f.conns:
		return fc
	case <-time.After(wait):
		f.t.Fatal("no connection")
		return nil
	}
}

func (fc *fakeConn) send(v any) {
	fc.wmu.Lock()
	defer fc.wmu.Unlock()
	_ = fc.ws.WriteJSON(v)
}

// expect reads the next request, which must have action and (for subscribe
// and unsubscribe) key.
func (fc *fakeConn) expect(action string, k shared.EntityKey) request {
	fc.t.Helper()
	select {
	case req, ok := <-fc.reqs:
		if !ok {
			fc.t.Fatalf("connection ended while waiting for %s %s", action, k)
		}
		if req.Action != action || (action != "secret" && req.key() != k) {
			fc.t.Fatalf("got request %s %s, want %s %s", req.Action, req.Body, action, k)
		}
		if req.Ref == "" {
			fc.t.Fatalf("request %s %s carries no ref", req.Action, req.Body)
		}
		return req
	case <-time.After(wait):
		fc.t.Fatalf("no %s %s request", action, k)
		return request{}
	}
}

// noRequest checks that the client sent nothing more, using a subscription
// to fence as a marker: requests are sent in order.
func (fc *fakeConn) noRequestBefore(fence shared.EntityKey) {
	fc.t.Helper()
	fc.expect("subscribe", fence)
}

func (fc *fakeConn) ack(req request) { fc.send(map[string]any{"type": "ack", "ref": req.Ref}) }

func (fc *fakeConn) rows(k shared.EntityKey, seq int, rows ...string) {
	raw := make([]json.RawMessage, len(rows))
	for i, r := range rows {
		raw[i] = json.RawMessage(r)
	}
	fc.send(map[string]any{"type": "rows", "key": k, "seq": seq, "rows": raw})
}

func (fc *fakeConn) gone(k shared.EntityKey, seq int) {
	fc.send(map[string]any{"type": "gone", "key": k, "seq": seq})
}

// expectRows reads the next callback, which must be Rows holding want.
func (r *recorder) expectRows(want string) {
	r.t.Helper()
	e := r.next()
	if e.kind != "rows" || len(e.rows) != 1 || string(e.rows[0]) != want {
		r.t.Fatalf("got %v, want rows[%s]", e, want)
	}
}

func (r *recorder) expectKind(kind string) event {
	r.t.Helper()
	e := r.next()
	if e.kind != kind {
		r.t.Fatalf("got %v, want %s", e, kind)
	}
	return e
}

// TestStaleSeqIsDropped: a frame whose seq is not above the last applied
// one is dropped; after a reconnect numbering starts afresh.
func TestStaleSeqIsDropped(t *testing.T) {
	f := startFake(t)
	st := newStates(t)
	c := dial(t, f.url, fast(esclient.Options{OnState: st.onState}))
	st.await(esclient.Connected)
	fc := f.accept()
	k := key("items", "1")
	r := newRecorder(t)
	r.subscribe(c, k)
	fc.ack(fc.expect("subscribe", k))
	fc.rows(k, 5, `"v5"`)
	fc.rows(k, 3, `"v3"`) // older: dropped
	fc.rows(k, 5, `"v5 again"`)
	fc.gone(k, 6)
	fc.rows(k, 4, `"v4"`) // older: dropped
	fc.rows(k, 7, `"v7"`)
	r.expectRows(`"v5"`)
	r.expectKind("gone")
	r.expectRows(`"v7"`)

	fc.ws.Close()
	st.await(esclient.Disconnected)
	fc = f.accept()
	fc.ack(fc.expect("subscribe", k))
	fc.rows(k, 1, `"new server v1"`) // a new connection starts afresh
	r.expectRows(`"new server v1"`)
	r.none()
}

// TestResubscribeWhileUnsubscribeInFlight: a key unsubscribed and
// subscribed again before the server acknowledged the unsubscribe may get a
// new server-side subscription whose seq restarts; its frames must not be
// dropped as stale.
func TestResubscribeWhileUnsubscribeInFlight(t *testing.T) {
	f := startFake(t)
	c := dial(t, f.url, esclient.Options{})
	fc := f.accept()
	k := key("items", "1")
	r1 := newRecorder(t)
	unsub := r1.subscribe(c, k)
	fc.ack(fc.expect("subscribe", k))
	fc.rows(k, 5, `"old 5"`)
	r1.expectRows(`"old 5"`)

	unsub()
	unsubReq := fc.expect("unsubscribe", k)
	r2 := newRecorder(t)
	r2.subscribe(c, k)
	subReq := fc.expect("subscribe", k)
	fc.rows(k, 6, `"old 6"`) // written before the server saw the unsubscribe
	fc.rows(k, 1, `"new 1"`) // the new subscription's initial state
	fc.ack(unsubReq)
	fc.ack(subReq)
	fc.rows(k, 2, `"new 2"`)
	fc.rows(k, 2, `"new 2 again"`) // strict again after the ack
	r2.expectRows(`"old 6"`)
	r2.expectRows(`"new 1"`)
	r2.expectRows(`"new 2"`)
	fence := key("items", "fence")
	c.Subscribe(fence, nil, nil)
	fc.ack(fc.expect("subscribe", fence))
	fc.rows(fence, 1, `"f"`)
	rf := newRecorder(t)
	rf.subscribe(c, fence) // joins the fence: its cached state comes at once...
	rf.expectRows(`"f"`)   // ...after every earlier callback
	r1.none()
	r2.none()
}

// TestRevoked: a revoked subscription gets Revoked (or Gone when it has no
// Revoked callback), nothing more, and is not sent again on reconnect.
func TestRevoked(t *testing.T) {
	f := startFake(t)
	st := newStates(t)
	c := dial(t, f.url, fast(esclient.Options{OnState: st.onState}))
	fc := f.accept()
	k, other := key("items", "secret"), key("items", "public")
	full := newRecorder(t)
	full.subscribe(c, k)
	fc.ack(fc.expect("subscribe", k))
	goneOnly := make(chan struct{}, 4)
	c.Subscribe(k, nil, func() { goneOnly <- struct{}{} })
	pub := newRecorder(t)
	pub.subscribe(c, other)
	fc.ack(fc.expect("subscribe", other))

	fc.send(map[string]any{"type": "revoked", "key": k, "reason": "access withdrawn"})
	fc.rows(k, 9, `"must not arrive"`)
	fc.rows(other, 1, `"public"`)
	if e := full.expectKind("revoked"); e.reason != "access withdrawn" {
		t.Fatalf("reason %q", e.reason)
	}
	pub.expectRows(`"public"`)
	select {
	case <-goneOnly:
	default:
		t.Fatal("the subscription without a Revoked callback got no Gone")
	}

	fc.ws.Close()
	st.await(esclient.Disconnected)
	fc = f.accept()
	fc.ack(fc.expect("subscribe", other)) // and not the revoked key
	fence := key("items", "fence")
	c.Subscribe(fence, nil, nil)
	fc.noRequestBefore(fence)
	full.none()
}

// TestRefusedSubscription: a refused subscribe ends the subscription with an
// Error callback and is not sent again on reconnect; rate_limited is retried.
func TestRefusedSubscription(t *testing.T) {
	f := startFake(t)
	errs := make(chan error, 16)
	st := newStates(t)
	c := dial(t, f.url, fast(esclient.Options{OnState: st.onState, OnError: func(err error) { errs <- err }}))
	fc := f.accept()
	forbidden, limited := key("items", "forbidden"), key("items", "limited")

	rf := newRecorder(t)
	rf.subscribe(c, forbidden)
	req := fc.expect("subscribe", forbidden)
	fc.send(map[string]any{"type": "error", "ref": req.Ref, "code": "forbidden", "message": "no"})
	serr := asServerError(t, rf.expectKind("error").err)
	if serr.Code != shared.CodeForbidden || serr.Key != forbidden || serr.Message != "no" {
		t.Fatalf("got %+v", serr)
	}

	rl := newRecorder(t)
	rl.subscribe(c, limited)
	req = fc.expect("subscribe", limited)
	fc.send(map[string]any{"type": "error", "ref": req.Ref, "code": "rate_limited", "message": "slow down"})
	if serr := asServerError(t, recvErr(t, errs)); serr.Code != shared.CodeRateLimited {
		t.Fatalf("OnError got %+v", serr)
	}
	fc.ack(fc.expect("subscribe", limited)) // retried after a delay
	fc.rows(limited, 1, `"ok"`)
	rl.expectRows(`"ok"`)

	// An error frame without a ref goes to OnError.
	fc.send(map[string]any{"type": "error", "code": "bad_request", "message": "what"})
	if serr := asServerError(t, recvErr(t, errs)); serr.Code != shared.CodeBadRequest || serr.Action != "" {
		t.Fatalf("OnError got %+v", serr)
	}

	fc.ws.Close()
	st.await(esclient.Disconnected)
	fc = f.accept()
	fc.ack(fc.expect("subscribe", limited)) // not the forbidden one
	fence := key("items", "fence")
	c.Subscribe(fence, nil, nil)
	fc.noRequestBefore(fence)
	rf.none()
}

// TestReconnectSendsSecretFirst: after a reconnect the secret precedes the
// subscriptions.
func TestReconnectSendsSecretFirst(t *testing.T) {
	f := startFake(t)
	st := newStates(t)
	c := dial(t, f.url, fast(esclient.Options{OnState: st.onState}))
	fc := f.accept()
	k := key("items", "1")
	c.Subscribe(k, nil, nil)
	fc.expect("subscribe", k)
	c.SetSecret("s3cret")
	if req := fc.expect("secret", shared.EntityKey{}); string(req.Body) != `"s3cret"` {
		t.Fatalf("secret body %s", req.Body)
	}
	fc.ws.Close()
	st.await(esclient.Disconnected)
	fc = f.accept()
	if req := fc.expect("secret", shared.EntityKey{}); string(req.Body) != `"s3cret"` {
		t.Fatalf("secret body %s", req.Body)
	}
	fc.expect("subscribe", k)
}

func recvErr(t *testing.T, errs <-chan error) error {
	t.Helper()
	select {
	case err := <-errs:
		return err
	case <-time.After(wait):
		t.Fatal("no error reported")
		return nil
	}
}
