package esclient_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esclient"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// wait bounds every wait for an event; generous for -race on a busy machine.
const wait = 10 * time.Second

// fast makes reconnects quick in tests.
func fast(o esclient.Options) esclient.Options {
	o.MinBackoff = 5 * time.Millisecond
	o.MaxBackoff = 50 * time.Millisecond
	return o
}

func key(entity, id string) shared.EntityKey {
	return shared.EntityKey{Entity: shared.EntityType(entity), ID: id}
}

// server runs an entity-sync server with the entity type "items" over store.
func server(t *testing.T, store *testkit.Store, cfg entitysync.Config) (*entitysync.EntitySync, string) {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = testkit.Logger()
	}
	e, srv := testkit.Serve(t, cfg)
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatalf("register: %v", err)
	}
	return e, wsURL(srv.URL)
}

func wsURL(httpURL string) string {
	return "ws" + strings.TrimPrefix(httpURL, "http") + shared.WebsocketPath
}

// change bumps key in store and notifies through e.
func change(t *testing.T, e *entitysync.EntitySync, store *testkit.Store, k shared.EntityKey) int {
	t.Helper()
	v := store.Bump(k)
	if err := e.NotifyAllOfChange(k); err != nil {
		t.Fatalf("notify: %v", err)
	}
	return v
}

// event is one callback of a subscription.
type event struct {
	kind   string // rows, gone, revoked, error
	rows   []json.RawMessage
	reason string
	err    error
}

func (e event) String() string {
	switch e.kind {
	case "rows":
		parts := make([]string, len(e.rows))
		for i, r := range e.rows {
			parts[i] = string(r)
		}
		return "rows[" + strings.Join(parts, ",") + "]"
	case "revoked":
		return "revoked(" + e.reason + ")"
	case "error":
		return "error(" + e.err.Error() + ")"
	}
	return e.kind
}

// recorder collects a subscription's callbacks.
type recorder struct {
	t      *testing.T
	events chan event
	last   int // the last version seen, for the order check
}

func newRecorder(t *testing.T) *recorder {
	return &recorder{t: t, events: make(chan event, 1024), last: -1}
}

func (r *recorder) put(e event) {
	select {
	case r.events <- e:
	default:
		r.t.Errorf("recorder full; dropped %v", e)
	}
}

func (r *recorder) handlers() esclient.Handlers {
	return esclient.Handlers{
		Rows:    func(rows []json.RawMessage) { r.put(event{kind: "rows", rows: rows}) },
		Gone:    func() { r.put(event{kind: "gone"}) },
		Revoked: func(reason string) { r.put(event{kind: "revoked", reason: reason}) },
		Error:   func(err error) { r.put(event{kind: "error", err: err}) },
	}
}

func (r *recorder) subscribe(c *esclient.Client, k shared.EntityKey) func() {
	r.t.Helper()
	unsub, err := c.SubscribeWith(k, r.handlers())
	if err != nil {
		r.t.Fatalf("subscribe %s: %v", k, err)
	}
	return unsub
}

func (r *recorder) next() event {
	r.t.Helper()
	select {
	case e := <-r.events:
		return e
	case <-time.After(wait):
		r.t.Fatalf("no callback within %s", wait)
		return event{}
	}
}

// none checks that no callback is waiting.
func (r *recorder) none() {
	r.t.Helper()
	select {
	case e := <-r.events:
		r.t.Fatalf("unexpected callback %v", e)
	default:
	}
}

// row reads the next callback, which must be Rows with one store row.
func (r *recorder) row() testkit.Row {
	r.t.Helper()
	e := r.next()
	if e.kind != "rows" || len(e.rows) != 1 {
		r.t.Fatalf("got %v, want one row", e)
	}
	row := testkit.ParseRow(e.rows[0])
	if row.Version < r.last {
		r.t.Fatalf("version went back from %d to %d", r.last, row.Version)
	}
	r.last = row.Version
	return row
}

// await reads rows until one has version v or later. Versions must never
// go back.
func (r *recorder) await(v int) testkit.Row {
	r.t.Helper()
	for {
		if row := r.row(); row.Version >= v {
			return row
		}
	}
}

// states records connection states.
type states struct {
	t  *testing.T
	ch chan esclient.State
}

func newStates(t *testing.T) *states {
	return &states{t: t, ch: make(chan esclient.State, 1024)}
}

func (s *states) onState(st esclient.State, _ error) {
	select {
	case s.ch <- st:
	default:
		s.t.Errorf("state recorder full")
	}
}

// await reads states until want.
func (s *states) await(want esclient.State) {
	s.t.Helper()
	deadline := time.After(wait)
	for {
		select {
		case st := <-s.ch:
			if st == want {
				return
			}
		case <-deadline:
			s.t.Fatalf("state %v not reached within %s", want, wait)
		}
	}
}

func dial(t *testing.T, url string, opts esclient.Options) *esclient.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := esclient.Dial(ctx, url, opts)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// proxy is a TCP proxy in front of a server whose connections a test can
// cut, and which can refuse service for a while.
type proxy struct {
	ln     net.Listener
	target string

	mu    sync.Mutex
	down  bool
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func startProxy(t *testing.T, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target, conns: make(map[net.Conn]struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		ln.Close()
		p.Cut()
		p.wg.Wait()
	})
	return p
}

// Addr is the proxy's host:port.
func (p *proxy) Addr() string { return p.ln.Addr().String() }

func (p *proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go p.pipe(c)
	}
}

func (p *proxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.down {
		return false
	}
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
	return true
}

func (p *proxy) pipe(c net.Conn) {
	defer p.wg.Done()
	defer c.Close()
	if !p.track(c) {
		return
	}
	u, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer u.Close()
	if !p.track(u) {
		return
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(u, c)
		u.Close()
	}()
	_, _ = io.Copy(c, u)
	c.Close()
	<-done
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, u)
	p.mu.Unlock()
}

// Cut drops every connection through the proxy, with no close frame: as a
// network failure or a crashed server looks to the client.
func (p *proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
	}
}

// SetDown makes the proxy drop new connections at once (down) or serve them.
func (p *proxy) SetDown(down bool) {
	p.mu.Lock()
	p.down = down
	p.mu.Unlock()
}

func asServerError(t *testing.T, err error) *esclient.ServerError {
	t.Helper()
	var serr *esclient.ServerError
	if !errors.As(err, &serr) {
		t.Fatalf("got %v (%T), want a *esclient.ServerError", err, err)
	}
	return serr
}

func timeout() <-chan time.Time { return time.After(wait) }
