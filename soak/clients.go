//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esclient"
	"github.com/entity-sync/entity-sync/internal/childproc"
	"github.com/entity-sync/entity-sync/shared"
)

// clientsHello is the clients process's first stdout line.
type clientsHello struct {
	Ctl string `json:"ctl"` // control base URL
}

// checkRequest is /check's body: the store's version of every key.
type checkRequest struct {
	Versions []int64 `json:"versions"`
}

// checkResult is /check's answer.
type checkResult struct {
	Clients       int      `json:"clients"`
	Connected     int      `json:"connected"`
	Subscriptions int      `json:"subscriptions"` // keys subscribed, over all clients
	Matched       int      `json:"matched"`       // of which the client holds the store's version
	Stale         int      `json:"stale"`         // holds an older version
	Missing       int      `json:"missing"`       // received nothing yet
	Ahead         int      `json:"ahead"`         // holds a version the store does not have
	StaleExamples []string `json:"stale_examples,omitempty"`
	StaleKeys     []int    `json:"stale_keys,omitempty"` // distinct stale or missing keys (up to 10)
	Violations    int64    `json:"violations"`           // rows older than one received before on the same connection
	ViolationEx   []string `json:"violation_examples,omitempty"`
	Rows          int64    `json:"rows"`       // rows callbacks, all clients
	Reconnects    int64    `json:"reconnects"` // connections after a client's first
	BadRows       int64    `json:"bad_rows"`   // rows that did not decode or were about another key
	Errors        int64    `json:"errors"`     // esclient OnError / subscription errors
	ErrorEx       []string `json:"error_examples,omitempty"`
	PerServer     []int    `json:"per_server"` // connected clients per server (index in -server-urls)
	// Stale and missing subscriptions by where their client is: connected
	// to server i (StaleOn[i]) or not connected (StaleOff).
	StaleOn    []int    `json:"stale_on"`
	StaleOff   int      `json:"stale_off"`
	Misbehaved misStats `json:"misbehaved"`
	Goroutines int      `json:"goroutines"`
}

// misStats counts what the misbehaving clients did.
type misStats struct {
	StuckEpisodes    int64 `json:"stuck_episodes"`
	StuckSubscribes  int64 `json:"stuck_subscribes"`
	FloodEpisodes    int64 `json:"flood_episodes"`
	FloodRequests    int64 `json:"flood_requests"`
	FloodDropped     int64 `json:"flood_dropped"` // flood connections the server closed
	ChurnEpisodes    int64 `json:"churn_episodes"`
	ChurnConnections int64 `json:"churn_connections"`
	DialErrors       int64 `json:"dial_errors"`
}

// soakClient is one esclient client and what it received.
type soakClient struct {
	n      int
	client *esclient.Client
	dialed atomic.Int32 // index of the server the last dial reached

	mu        sync.Mutex
	connected bool
	server    int
	conns     int
	subs      map[int]func() // key number -> unsubscribe
	last      map[int]int64  // the last version per key on the current connection
	hold      map[int]int64  // the last version per key, across connections
}

type clientsProc struct {
	cfg     config
	servers []string // host:port
	clients []*soakClient

	rows, violations, badRows, errors, reconnects atomic.Int64
	exMu                                          sync.Mutex
	violationEx, errorEx                          []string

	mis      misStats // atomically updated fields
	quiet    chan struct{}
	quietOne sync.Once
	ctx      context.Context
}

func (p *clientsProc) example(list *[]string, format string, args ...any) {
	p.exMu.Lock()
	defer p.exMu.Unlock()
	if len(*list) < 10 {
		*list = append(*list, fmt.Sprintf(format, args...))
	}
}

// runClients is the clients role. It exits when its stdin closes.
func runClients(cfg config) int {
	logrus.SetLevel(logrus.WarnLevel)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	p := &clientsProc{cfg: cfg, quiet: make(chan struct{}), ctx: ctx}
	for _, s := range strings.Split(cfg.serverURLs, ",") {
		u, err := url.Parse(s)
		if err != nil {
			fmt.Fprintf(os.Stderr, "soak clients: bad server URL %q: %v\n", s, err)
			return 2
		}
		p.servers = append(p.servers, u.Host)
	}
	rng := rand.New(rand.NewPCG(uint64(cfg.seed), 2))

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintf(os.Stderr, "soak clients: listen: %v\n", err)
		return 1
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/check", p.handleCheck)
	mux.HandleFunc("/quiet", func(w http.ResponseWriter, r *http.Request) {
		p.quietOne.Do(func() { close(p.quiet) })
		writeJSON(w, struct{}{})
	})
	mux.HandleFunc("/misbehave", p.handleMisbehave)
	go func() { _ = http.Serve(l, mux) }()

	// Start the clients, a few at a time, each on a random server.
	for i := range cfg.clients {
		sc := &soakClient{n: i, subs: map[int]func(){}, last: map[int]int64{}, hold: map[int]int64{}}
		c, err := esclient.New("ws://soak.invalid"+shared.WebsocketPath, esclient.Options{
			Dialer:  p.dialer(sc, nil),
			OnState: func(s esclient.State, err error) { p.onState(sc, s) },
			OnError: func(err error) {
				p.errors.Add(1)
				p.example(&p.errorEx, "client %d: %v", sc.n, err)
			},
		})
		if err != nil {
			fmt.Fprintf(os.Stderr, "soak clients: %v\n", err)
			return 1
		}
		sc.client = c
		p.clients = append(p.clients, sc)
		for _, k := range rng.Perm(cfg.keys)[:min(cfg.perClient, cfg.keys)] {
			p.subscribe(sc, k)
		}
		if i%50 == 49 {
			time.Sleep(50 * time.Millisecond)
		}
	}
	writeJSON(os.Stdout, clientsHello{Ctl: "http://" + l.Addr().String()})

	go p.churn(rng.Uint64())

	childproc.WaitForParent(childLifetime)
	cancel()
	var wg sync.WaitGroup
	for _, sc := range p.clients {
		wg.Go(func() { _ = sc.client.Close() })
	}
	wg.Wait()
	return 0
}

// dialer returns a websocket dialer that connects to a random live server:
// esclient takes one URL, and this is how its reconnects reach the other
// servers when one is down. Each server is tried once per dial, in random
// order. sc, if set, records which server the dial reached. rcvbuf, if set,
// shrinks the socket's receive buffer.
func (p *clientsProc) dialer(sc *soakClient, control func(network, address string, c syscall.RawConn) error) *websocket.Dialer {
	return &websocket.Dialer{
		HandshakeTimeout: 10 * time.Second,
		NetDialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			d := net.Dialer{Timeout: time.Second, Control: control}
			var errs []string
			for _, i := range rand.Perm(len(p.servers)) {
				c, err := d.DialContext(ctx, network, p.servers[i])
				if err == nil {
					if sc != nil {
						sc.dialed.Store(int32(i))
					}
					return c, nil
				}
				errs = append(errs, err.Error())
				if ctx.Err() != nil {
					break
				}
			}
			return nil, fmt.Errorf("no server reachable: %s", strings.Join(errs, "; "))
		},
	}
}

func (p *clientsProc) onState(sc *soakClient, s esclient.State) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	switch s {
	case esclient.Connected:
		sc.connected = true
		sc.server = int(sc.dialed.Load())
		sc.conns++
		if sc.conns > 1 {
			p.reconnects.Add(1)
		}
	default:
		if sc.connected {
			// Sequence numbers are per connection: after a reconnect
			// (possibly to another server) order starts afresh.
			clear(sc.last)
		}
		sc.connected = false
	}
}

// subscribe subscribes sc to key number k and checks every row it gets.
func (p *clientsProc) subscribe(sc *soakClient, k int) {
	id := keyID(k)
	key := shared.EntityKey{Entity: entity, ID: id}
	unsub, err := sc.client.SubscribeWith(key, esclient.Handlers{
		Rows: func(rows []json.RawMessage) {
			p.rows.Add(1)
			var r row
			if len(rows) != 1 || json.Unmarshal(rows[0], &r) != nil || r.ID != id {
				p.badRows.Add(1)
				return
			}
			sc.mu.Lock()
			defer sc.mu.Unlock()
			if last, ok := sc.last[k]; ok && r.V < last {
				p.violations.Add(1)
				p.example(&p.violationEx, "client %d key %s: version %d after %d on the same connection (server %d)", sc.n, id, r.V, last, sc.server)
			}
			sc.last[k] = r.V
			if _, ok := sc.subs[k]; ok {
				sc.hold[k] = r.V
			}
		},
		Gone: func() {
			p.badRows.Add(1) // every key always exists
		},
		Error: func(err error) {
			p.errors.Add(1)
			p.example(&p.errorEx, "client %d key %s: %v", sc.n, id, err)
			sc.mu.Lock()
			delete(sc.subs, k)
			delete(sc.hold, k)
			sc.mu.Unlock()
		},
		Revoked: func(reason string) {
			p.errors.Add(1)
			p.example(&p.errorEx, "client %d key %s: revoked: %s", sc.n, id, reason)
		},
	})
	if err != nil {
		p.errors.Add(1)
		p.example(&p.errorEx, "client %d key %s: %v", sc.n, id, err)
		return
	}
	sc.mu.Lock()
	sc.subs[k] = unsub
	sc.mu.Unlock()
}

// churn moves random clients' subscriptions to other keys, cfg.churn times
// a second, until the quiet period.
func (p *clientsProc) churn(seed uint64) {
	if p.cfg.churn <= 0 || p.cfg.perClient >= p.cfg.keys {
		return
	}
	rng := rand.New(rand.NewPCG(seed, 3))
	t := time.NewTicker(time.Second / time.Duration(p.cfg.churn))
	defer t.Stop()
	for {
		select {
		case <-p.quiet:
			return
		case <-p.ctx.Done():
			return
		case <-t.C:
		}
		sc := p.clients[rng.IntN(len(p.clients))]
		sc.mu.Lock()
		var drop = -1
		for k := range sc.subs { // random enough: map order
			drop = k
			break
		}
		add := rng.IntN(p.cfg.keys)
		_, held := sc.subs[add]
		var unsub func()
		if drop >= 0 {
			unsub = sc.subs[drop]
			delete(sc.subs, drop)
			delete(sc.hold, drop)
		}
		sc.mu.Unlock()
		if unsub != nil {
			unsub()
		}
		if !held && add != drop {
			p.subscribe(sc, add)
		}
	}
}

func (p *clientsProc) handleCheck(w http.ResponseWriter, r *http.Request) {
	var req checkRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	res := checkResult{Clients: len(p.clients), PerServer: make([]int, len(p.servers)), StaleOn: make([]int, len(p.servers))}
	for _, sc := range p.clients {
		sc.mu.Lock()
		if sc.connected {
			res.Connected++
			res.PerServer[sc.server]++
		}
		for k := range sc.subs {
			res.Subscriptions++
			v, ok := sc.hold[k]
			want := req.Versions[k]
			if !ok || v < want {
				if !slices.Contains(res.StaleKeys, k) && len(res.StaleKeys) < 10 {
					res.StaleKeys = append(res.StaleKeys, k)
				}
				if sc.connected {
					res.StaleOn[sc.server]++
				} else {
					res.StaleOff++
				}
			}
			switch {
			case !ok:
				res.Missing++
				if len(res.StaleExamples) < 5 {
					res.StaleExamples = append(res.StaleExamples, fmt.Sprintf("client %d key %s: nothing received (store %d, connected %v)", sc.n, keyID(k), want, sc.connected))
				}
			case v == want:
				res.Matched++
			case v < want:
				res.Stale++
				if len(res.StaleExamples) < 5 {
					res.StaleExamples = append(res.StaleExamples, fmt.Sprintf("client %d key %s: holds %d, store %d (server %d, connected %v)", sc.n, keyID(k), v, want, sc.server, sc.connected))
				}
			default:
				res.Ahead++
			}
		}
		sc.mu.Unlock()
	}
	res.Violations = p.violations.Load()
	res.Rows = p.rows.Load()
	res.Reconnects = p.reconnects.Load()
	res.BadRows = p.badRows.Load()
	res.Errors = p.errors.Load()
	p.exMu.Lock()
	res.ViolationEx = append([]string(nil), p.violationEx...)
	res.ErrorEx = append([]string(nil), p.errorEx...)
	p.exMu.Unlock()
	res.Misbehaved = misStats{
		StuckEpisodes:    atomic.LoadInt64(&p.mis.StuckEpisodes),
		StuckSubscribes:  atomic.LoadInt64(&p.mis.StuckSubscribes),
		FloodEpisodes:    atomic.LoadInt64(&p.mis.FloodEpisodes),
		FloodRequests:    atomic.LoadInt64(&p.mis.FloodRequests),
		FloodDropped:     atomic.LoadInt64(&p.mis.FloodDropped),
		ChurnEpisodes:    atomic.LoadInt64(&p.mis.ChurnEpisodes),
		ChurnConnections: atomic.LoadInt64(&p.mis.ChurnConnections),
		DialErrors:       atomic.LoadInt64(&p.mis.DialErrors),
	}
	res.Goroutines = runtime.NumGoroutine()
	writeJSON(w, res)
}

// handleMisbehave starts one episode of a misbehaving client in the
// background: kind is stuck, flood or churn; for its duration.
func (p *clientsProc) handleMisbehave(w http.ResponseWriter, r *http.Request) {
	d, err := time.ParseDuration(r.URL.Query().Get("for"))
	if err != nil || d <= 0 || d > 5*time.Minute {
		http.Error(w, "bad for", http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(p.ctx, d)
	switch kind := r.URL.Query().Get("kind"); kind {
	case "stuck":
		atomic.AddInt64(&p.mis.StuckEpisodes, 1)
		go func() { defer cancel(); p.stuck(ctx) }()
	case "flood":
		atomic.AddInt64(&p.mis.FloodEpisodes, 1)
		go func() { defer cancel(); p.flood(ctx) }()
	case "churn":
		atomic.AddInt64(&p.mis.ChurnEpisodes, 1)
		go func() { defer cancel(); p.connChurn(ctx) }()
	default:
		cancel()
		http.Error(w, "unknown kind "+kind, http.StatusBadRequest)
		return
	}
	writeJSON(w, struct{}{})
}

// rawDial opens an envelope-protocol websocket to a random server, without
// esclient: the misbehaving clients break its rules on purpose.
func (p *clientsProc) rawDial(ctx context.Context, control func(string, string, syscall.RawConn) error) (*websocket.Conn, error) {
	d := p.dialer(nil, control)
	d.Subprotocols = []string{shared.Subprotocol}
	ws, _, err := d.DialContext(ctx, "ws://soak.invalid"+shared.WebsocketPath, nil)
	if err != nil {
		atomic.AddInt64(&p.mis.DialErrors, 1)
		return nil, err
	}
	return ws, nil
}

func subscribeFrame(k int, action string) []byte {
	b, _ := json.Marshal(map[string]any{"action": action, "body": shared.EntityKey{Entity: entity, ID: keyID(k)}})
	return b
}

// stuck subscribes to every key with a tiny receive buffer and never reads.
func (p *clientsProc) stuck(ctx context.Context) {
	small := func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		})
		if err != nil {
			return err
		}
		return serr
	}
	// A server may be down or starting (503): try again until one takes us.
	var ws *websocket.Conn
	for ws == nil {
		var err error
		if ws, err = p.rawDial(ctx, small); err != nil {
			if ctx.Err() != nil {
				return
			}
			sleepCtx(ctx, 200*time.Millisecond)
		}
	}
	defer ws.Close()
	for k := range p.cfg.keys {
		_ = ws.SetWriteDeadline(time.Now().Add(2 * time.Second))
		if ws.WriteMessage(websocket.TextMessage, subscribeFrame(k, "subscribe")) != nil {
			break
		}
		atomic.AddInt64(&p.mis.StuckSubscribes, 1)
	}
	<-ctx.Done()
}

// flood sends subscribe/unsubscribe requests as fast as the server takes
// them (it slows down reading past its rate limit), reading and discarding
// whatever comes back. At most 100,000 requests per episode.
func (p *clientsProc) flood(ctx context.Context) {
	for ctx.Err() == nil {
		ws, err := p.rawDial(ctx, nil)
		if err != nil {
			sleepCtx(ctx, 200*time.Millisecond)
			continue
		}
		go func() {
			for {
				if _, _, err := ws.NextReader(); err != nil {
					return
				}
			}
		}()
		stop := context.AfterFunc(ctx, func() { ws.Close() })
		for i := 0; ctx.Err() == nil && i < 100000; i++ {
			action := "subscribe"
			if i%2 == 1 {
				action = "unsubscribe"
			}
			_ = ws.SetWriteDeadline(time.Now().Add(15 * time.Second))
			if err := ws.WriteMessage(websocket.TextMessage, subscribeFrame(i/2%p.cfg.keys, action)); err != nil {
				if ctx.Err() == nil {
					atomic.AddInt64(&p.mis.FloodDropped, 1)
				}
				break
			}
			atomic.AddInt64(&p.mis.FloodRequests, 1)
		}
		stop()
		ws.Close()
		sleepCtx(ctx, 100*time.Millisecond)
	}
}

// connChurn opens connections, subscribes to three keys and drops the TCP
// connection without a close frame, about 20 times a second.
func (p *clientsProc) connChurn(ctx context.Context) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for n := 0; ctx.Err() == nil && n < 100000; n++ {
		if ws, err := p.rawDial(ctx, nil); err == nil {
			atomic.AddInt64(&p.mis.ChurnConnections, 1)
			for k := range 3 {
				_ = ws.SetWriteDeadline(time.Now().Add(time.Second))
				_ = ws.WriteMessage(websocket.TextMessage, subscribeFrame((n*3+k)%p.cfg.keys, "subscribe"))
			}
			if n%2 == 0 { // half wait for something to arrive first
				_ = ws.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
				_, _, _ = ws.ReadMessage()
			}
			_ = ws.NetConn().Close()
		}
		select {
		case <-ctx.Done():
		case <-t.C:
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
