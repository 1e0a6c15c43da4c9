package esweb_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esweb"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

func wsURL(httpURL string) string {
	return "ws" + strings.TrimPrefix(httpURL, "http") + shared.WebsocketPath
}

func dialStatus(t *testing.T, url string, header http.Header) int {
	t.Helper()
	c, resp, err := websocket.DefaultDialer.Dial(url, header)
	if err == nil {
		c.Close()
		return http.StatusSwitchingProtocols
	}
	if resp == nil {
		t.Fatalf("dial: %v", err)
	}
	return resp.StatusCode
}

func TestAuthenticateBeforeUpgrade(t *testing.T) {
	principals := make(chan any, 1)
	cfg := es.Config{
		Web: esweb.Options{Authenticate: func(r *http.Request) (any, error) {
			switch r.Header.Get("Authorization") {
			case "Bearer good":
				return "alice", nil
			case "Bearer banned":
				return nil, fmt.Errorf("user banned: %w", shared.ErrForbidden)
			}
			return nil, errors.New("no valid token")
		}},
		Bridge: esbridge.Options{Authorize: func(ctx context.Context, key shared.EntityKey) error {
			conn, _ := shared.ConnectionFrom(ctx)
			principals <- conn.Principal
			return nil
		}},
	}
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, cfg)
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	if got := dialStatus(t, wsURL(srv.URL), nil); got != http.StatusUnauthorized {
		t.Errorf("no token: status %d, want 401", got)
	}
	if got := dialStatus(t, wsURL(srv.URL), http.Header{"Authorization": {"Bearer banned"}}); got != http.StatusForbidden {
		t.Errorf("banned: status %d, want 403", got)
	}
	c, _, err := websocket.DefaultDialer.Dial(wsURL(srv.URL), http.Header{"Authorization": {"Bearer good"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.WriteJSON(map[string]any{"action": "subscribe", "body": map[string]string{"entity": "items", "id": "1"}}); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-principals:
		if p != "alice" {
			t.Errorf("Authorize saw principal %v, want alice", p)
		}
	case <-time.After(wait):
		t.Fatal("Authorize not called")
	}
	if s := e.Web.Stats(); s.RefusedAuth != 2 {
		t.Errorf("RefusedAuth = %d, want 2", s.RefusedAuth)
	}
}

func TestOriginPolicy(t *testing.T) {
	for _, tc := range []struct {
		name   string
		opts   esweb.Options
		origin string
		want   int
	}{
		{"same origin", esweb.Options{}, "", http.StatusSwitchingProtocols},
		{"cross origin refused by default", esweb.Options{}, "https://evil.example", http.StatusForbidden},
		{"allow-list pattern", esweb.Options{AllowedOrigins: []string{"https://*.example.com"}}, "https://app.example.com", http.StatusSwitchingProtocols},
		{"allow-list miss", esweb.Options{AllowedOrigins: []string{"https://*.example.com"}}, "https://example.org", http.StatusForbidden},
		{"explicit opt-out", esweb.Options{AllowAnyOrigin: true}, "https://anything.test", http.StatusSwitchingProtocols},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, srv := testkit.Serve(t, es.Config{Web: tc.opts})
			h := http.Header{}
			origin := tc.origin
			if origin == "" {
				origin = srv.URL // the server's own origin
			}
			h.Set("Origin", origin)
			if got := dialStatus(t, wsURL(srv.URL), h); got != tc.want {
				t.Errorf("origin %s: status %d, want %d", origin, got, tc.want)
			}
		})
	}
}

// secretACL allows a key when the connection's secret is "may-<id>" or
// "may-all".
func secretACL(ctx context.Context, key shared.EntityKey) error {
	conn, _ := shared.ConnectionFrom(ctx)
	if s := conn.Secret(); s == "may-all" || s == "may-"+key.ID {
		return nil
	}
	return errors.New("secret does not grant " + key.String())
}

func TestDeniedKeyNeverDelivers(t *testing.T) {
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, es.Config{Bridge: esbridge.Options{Authorize: secretACL}})
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	c, next := dialEnvelope(t, srv.URL)
	next() // welcome
	send := func(v any) {
		t.Helper()
		if err := c.WriteJSON(v); err != nil {
			t.Fatal(err)
		}
	}
	send(map[string]any{"action": "secret", "body": "may-fence"})
	send(map[string]any{"action": "subscribe", "ref": "x", "body": map[string]string{"entity": "items", "id": "secret-doc"}})
	if got := next(); got.Type != "error" || got.Code != "forbidden" || got.Ref != "x" {
		t.Fatalf("got %+v, want forbidden error", got)
	}
	send(map[string]any{"action": "subscribe", "body": map[string]string{"entity": "items", "id": "fence"}})
	if got := next(); got.Type != "rows" || got.Key.ID != "fence" {
		t.Fatalf("got %+v, want the fence's rows", got)
	}
	// The denied key changes; only the fence's change may arrive.
	for _, id := range []string{"secret-doc", "fence"} {
		k := shared.EntityKey{Entity: "items", ID: id}
		store.Bump(k)
		if err := e.NotifyAllOfChange(k); err != nil {
			t.Fatal(err)
		}
	}
	if got := next(); got.Key.ID != "fence" {
		t.Fatalf("denied key delivered: %+v", got)
	}
	if n := store.FetchesOf(shared.EntityKey{Entity: "items", ID: "secret-doc"}); n != 0 {
		t.Errorf("denied key was fetched %d times", n)
	}
}

func TestRevocationAndSecretChange(t *testing.T) {
	store := testkit.NewStore()
	var mu sync.Mutex
	banned := map[string]bool{}
	authorize := func(ctx context.Context, key shared.EntityKey) error {
		mu.Lock()
		defer mu.Unlock()
		if banned[key.ID] {
			return errors.New("banned")
		}
		return secretACL(ctx, key)
	}
	e, srv := testkit.Serve(t, es.Config{Bridge: esbridge.Options{Authorize: authorize}})
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	c, next := dialEnvelope(t, srv.URL)
	next() // welcome
	for _, m := range []any{
		map[string]any{"action": "secret", "body": "may-all"},
		map[string]any{"action": "subscribe", "body": map[string]string{"entity": "items", "id": "a"}},
		map[string]any{"action": "subscribe", "body": map[string]string{"entity": "items", "id": "b"}},
	} {
		if err := c.WriteJSON(m); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	for len(seen) < 2 {
		seen[next().Key.ID] = true
	}

	// On demand: a rule changes, the app asks for a re-check.
	mu.Lock()
	banned["a"] = true
	mu.Unlock()
	if n := e.Bridge.Reauthorize(nil); n != 1 {
		t.Fatalf("Reauthorize withdrew %d subscriptions, want 1", n)
	}
	if got := next(); got.Type != "revoked" || got.Key.ID != "a" {
		t.Fatalf("got %+v, want revoked items/a", got)
	}

	// A new secret re-checks what is left: "may-c" does not grant b.
	if err := c.WriteJSON(map[string]any{"action": "secret", "body": "may-c"}); err != nil {
		t.Fatal(err)
	}
	if got := next(); got.Type != "revoked" || got.Key.ID != "b" {
		t.Fatalf("got %+v, want revoked items/b", got)
	}

	// Revoked keys stay silent when they change; a fence proves it.
	if err := c.WriteJSON(map[string]any{"action": "subscribe", "body": map[string]string{"entity": "items", "id": "c"}}); err != nil {
		t.Fatal(err)
	}
	if got := next(); got.Key.ID != "c" {
		t.Fatalf("got %+v, want items/c", got)
	}
	for _, id := range []string{"a", "b", "c"} {
		k := shared.EntityKey{Entity: "items", ID: id}
		store.Bump(k)
		if err := e.NotifyAllOfChange(k); err != nil {
			t.Fatal(err)
		}
	}
	if got := next(); got.Key.ID != "c" || got.Type != "rows" {
		t.Fatalf("revoked key delivered: %+v", got)
	}
}

func TestRowFilter(t *testing.T) {
	e, srv := testkit.Serve(t, es.Config{Bridge: esbridge.Options{
		Filter: func(ctx context.Context, _ shared.EntityKey, rows [][]byte) [][]byte {
			conn, _ := shared.ConnectionFrom(ctx)
			if conn.Secret() == "admin" {
				return rows
			}
			var public [][]byte
			for _, r := range rows {
				if !bytes.Contains(r, []byte("private")) {
					public = append(public, r)
				}
			}
			return public
		},
	}})
	fetches := 0
	var mu sync.Mutex
	if err := e.Register("items", func(context.Context, shared.EntityKey) ([][]byte, error) {
		mu.Lock()
		fetches++
		mu.Unlock()
		return [][]byte{[]byte(`{"v":"public"}`), []byte(`{"v":"private"}`)}, nil
	}); err != nil {
		t.Fatal(err)
	}
	admin, nextAdmin := dialEnvelope(t, srv.URL)
	user, nextUser := dialEnvelope(t, srv.URL)
	nextAdmin()
	nextUser()
	if err := admin.WriteJSON(map[string]any{"action": "secret", "body": "admin"}); err != nil {
		t.Fatal(err)
	}
	sub := map[string]any{"action": "subscribe", "ref": "s", "body": map[string]string{"entity": "items", "id": "1"}}
	for _, c := range []*websocket.Conn{admin, user} {
		if err := c.WriteJSON(sub); err != nil {
			t.Fatal(err)
		}
	}
	nextAdmin() // ack
	nextUser()  // ack
	if got := nextAdmin(); len(got.Rows) != 2 {
		t.Errorf("admin got %d rows, want 2", len(got.Rows))
	}
	if got := nextUser(); len(got.Rows) != 1 || !strings.Contains(string(got.Rows[0]), "public") {
		t.Errorf("user got %s, want the public row only", got.Rows)
	}
}

func TestLimits(t *testing.T) {
	store := testkit.NewStore()
	t.Run("connections", func(t *testing.T) {
		e, srv := testkit.Serve(t, es.Config{Web: esweb.Options{MaxConnections: 2}})
		testkit.Dial(t, srv)
		testkit.Dial(t, srv)
		if got := dialStatus(t, wsURL(srv.URL), nil); got != http.StatusServiceUnavailable {
			t.Errorf("third connection: status %d, want 503", got)
		}
		if e.Web.Stats().RefusedFull != 1 {
			t.Error("refusal not counted")
		}
	})
	t.Run("connections back to back", func(t *testing.T) {
		// A client that dials again as soon as its upgrade is answered
		// gets a slot while the limit allows one. Each connection's
		// handler is held right after the connection is registered until
		// every dial is done, so each dial lands in that moment: the
		// server once counted a connection there both as open and as
		// still upgrading, and refused a dial the limit allowed.
		const limit = 5
		e, srv := testkit.Serve(t, es.Config{Web: esweb.Options{MaxConnections: limit}})
		opened, release := make(chan struct{}, limit+1), make(chan struct{})
		esweb.SetOpenedHook(e.Web, func() {
			opened <- struct{}{}
			<-release
		})
		defer close(release)
		for n := 1; n <= limit; n++ {
			testkit.Dial(t, srv)
			select {
			case <-opened:
			case <-time.After(wait):
				t.Fatalf("connection %d was not registered within %v", n, wait)
			}
		}
		if got := dialStatus(t, wsURL(srv.URL), nil); got != http.StatusServiceUnavailable {
			t.Errorf("connection %d: status %d, want 503", limit+1, got)
		}
	})
	t.Run("subscriptions", func(t *testing.T) {
		e, srv := testkit.Serve(t, es.Config{Web: esweb.Options{MaxSubscriptions: 2}})
		if err := e.Register("items", store.Fetch); err != nil {
			t.Fatal(err)
		}
		c, next := dialEnvelope(t, srv.URL)
		next()
		for i, id := range []string{"1", "2", "1", "3"} {
			if err := c.WriteJSON(map[string]any{"action": "subscribe", "ref": fmt.Sprint(i), "body": map[string]string{"entity": "items", "id": id}}); err != nil {
				t.Fatal(err)
			}
		}
		for {
			f := next()
			if f.Type == "error" {
				if f.Code != "too_many_subscriptions" || f.Ref != "3" {
					t.Fatalf("got %+v, want too_many_subscriptions for ref 3", f)
				}
				break
			}
		}
	})
	t.Run("request rate", func(t *testing.T) {
		// Over the rate, requests wait for their token instead of being
		// dropped; a client that keeps the server waiting is closed.
		defer esweb.SetMaxThrottle(2 * time.Second)()
		_, srv := testkit.Serve(t, es.Config{Web: esweb.Options{MessagesPerSecond: 2, MessageBurst: 3}})
		c, next := dialEnvelope(t, srv.URL)
		next()
		start := time.Now()
		for i := 0; i < 5; i++ {
			if err := c.WriteJSON(map[string]any{"action": "secret", "ref": fmt.Sprint(i), "body": "s"}); err != nil {
				t.Fatal(err)
			}
		}
		for i := 0; i < 5; i++ {
			if f := next(); f.Type != "ack" || f.Ref != fmt.Sprint(i) {
				t.Fatalf("request %d: got %+v, want its ack", i, f)
			}
		}
		// 3 at once, then 2 per second: the 5th waited about a second.
		if d := time.Since(start); d < 800*time.Millisecond {
			t.Errorf("5 requests answered in %v: the rate limit did not hold them back", d)
		}
		for i := 0; i < 20; i++ { // 10 s worth at 2/s: past the 2 s allowed
			if err := c.WriteJSON(map[string]any{"action": "secret", "ref": "flood", "body": "s"}); err != nil {
				break
			}
		}
		_ = c.SetReadDeadline(time.Now().Add(wait))
		for {
			if _, _, err := c.ReadMessage(); err != nil {
				var ce *websocket.CloseError
				if !errors.As(err, &ce) || ce.Code != websocket.ClosePolicyViolation {
					t.Fatalf("flooding client ended with %v, want close 1008", err)
				}
				break
			}
		}
	})
	t.Run("id length", func(t *testing.T) {
		e, srv := testkit.Serve(t, es.Config{Web: esweb.Options{MaxIDLength: 8}})
		if err := e.Register("items", store.Fetch); err != nil {
			t.Fatal(err)
		}
		c, next := dialEnvelope(t, srv.URL)
		next()
		for _, id := range []string{"123456789", "bad\x01id"} {
			if err := c.WriteJSON(map[string]any{"action": "subscribe", "ref": "r", "body": map[string]string{"entity": "items", "id": id}}); err != nil {
				t.Fatal(err)
			}
			if f := next(); f.Type != "error" || f.Code != "invalid_key" {
				t.Fatalf("id %q: got %+v, want invalid_key", id, f)
			}
		}
	})
	t.Run("pending bytes", func(t *testing.T) {
		// A client that falls MaxPendingBytes behind is closed with 1008
		// once what it was already sent is through. It stops reading until
		// the server has seen it overflow, then reads to the close frame.
		const keys, rowSize = 40, 32 << 10
		// On one P the flusher runs late, after a direct write left the
		// tail of a frame in the backlog and the client overflowed: the
		// flusher once dropped that tail with the overflow, so the close
		// frame was read as the rest of a frame and never arrived (28
		// of 30 runs failed so; 11 of 20 on two loaded cores).
		defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
		store := testkit.NewStore()
		e, srv := testkit.Serve(t, es.Config{Bridge: esbridge.Options{MaxPendingBytes: 64 << 10}})
		if err := e.Register("big", func(_ context.Context, k shared.EntityKey) ([][]byte, error) {
			return [][]byte{append([]byte(fmt.Sprint(store.Version(k))), bytes.Repeat([]byte("x"), rowSize)...)}, nil
		}); err != nil {
			t.Fatal(err)
		}
		c, resp, err := websocket.DefaultDialer.Dial(wsURL(srv.URL), nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		defer c.Close()
		for i := 0; i < keys; i++ {
			if err := c.WriteJSON(map[string]any{"action": "subscribe", "body": map[string]string{"entity": "big", "id": fmt.Sprint(i)}}); err != nil {
				t.Fatal(err)
			}
		}
		for round := 0; e.Bridge.Stats().Overflows == 0; round++ {
			if round == 2000 {
				t.Fatal("no overflow after 2,000 rounds of changes to a client that does not read")
			}
			for i := 0; i < keys; i++ {
				k := shared.EntityKey{Entity: "big", ID: fmt.Sprint(i)}
				store.Bump(k)
				if err := e.NotifyAllOfChange(k); err != nil {
					t.Fatal(err)
				}
			}
		}
		_ = c.SetReadDeadline(time.Now().Add(wait))
		for {
			if _, _, err := c.ReadMessage(); err != nil {
				var ce *websocket.CloseError
				if !errors.As(err, &ce) || ce.Code != websocket.ClosePolicyViolation {
					t.Fatalf("closed with %v, want 1008", err)
				}
				break
			}
		}
		if e.Web.Stats().SlowClients != 1 {
			t.Error("slow client not counted")
		}
	})
}

func TestSecretsNeverLogged(t *testing.T) {
	var buf syncBuffer
	logger := logrus.New()
	logger.SetOutput(&buf)
	logger.SetLevel(logrus.TraceLevel)
	const secret = "hunter2-very-secret"
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, es.Config{
		Logger: logger,
		Web: esweb.Options{Authenticate: func(r *http.Request) (any, error) {
			if r.Header.Get("Authorization") != "Bearer "+secret {
				return nil, errors.New("bad token")
			}
			return "u", nil
		}},
		Bridge: esbridge.Options{Authorize: secretACL},
	})
	if err := e.RegisterEntityAndDBHandler("items", store.SeedHandler); err != nil {
		t.Fatal(err)
	}
	dialStatus(t, wsURL(srv.URL), http.Header{"Authorization": {"Bearer wrong-" + secret}})
	c, _, err := websocket.DefaultDialer.Dial(wsURL(srv.URL), http.Header{"Authorization": {"Bearer " + secret}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, frame := range []string{
		`{"action":"secret","body":"` + secret + `"}`,
		`{"action":"secret","body":{"` + secret + `":1}}`,
		`{"action":"subscribe","body":{"entity":"items","id":"1"}}`,
		`{"action":"` + secret + `"}`,
		`{"` + secret + `"`,
		`{"action":"secret","body":"may-all"}`,
		`{"action":"subscribe","body":{"entity":"items","id":"1"}}`,
	} {
		if err := c.WriteMessage(websocket.TextMessage, []byte(frame)); err != nil {
			t.Fatal(err)
		}
	}
	// The last subscribe is allowed; its rows prove every frame was handled.
	for {
		_ = c.SetReadDeadline(time.Now().Add(wait))
		_, b, err := c.ReadMessage()
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, []byte(`"secret":"may-all"`)) {
			break
		}
	}
	if strings.Contains(buf.String(), "hunter2") {
		t.Fatalf("a secret reached the log:\n%s", buf.String())
	}
	if !strings.Contains(buf.String(), "refused") {
		t.Fatalf("expected refusals in the log, got:\n%s", buf.String())
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
