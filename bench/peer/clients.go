//go:build linux

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/internal/childproc"
)

// The clients process holds one row's connections at a time, all to one
// server: websocket clients of any system (the same dialer, the same
// read loop), or the floor's plain TCP connections (floorclient.go). Its
// control endpoints let the orchestrator open them, record, wait for
// convergence, fetch the row's result and close them.

// fleet is the clients process's current websocket connections.
type fleet struct {
	dialer websocket.Dialer
	rec    recorder

	mu      sync.Mutex
	conns   []*wsClient
	readers sync.WaitGroup

	floor floorFleet
}

func runClients(cfg config) int {
	f := &fleet{dialer: websocket.Dialer{
		HandshakeTimeout: handshakeTimeout,
		// Small buffers, as for many idle clients; the same for both.
		ReadBufferSize:  1024,
		WriteBufferSize: 512,
	}}
	mux := http.NewServeMux()
	mux.HandleFunc("/open", f.handleOpen)
	mux.HandleFunc("/record", f.handleRecord)
	mux.HandleFunc("/wait", f.handleWait)
	mux.HandleFunc("/result", f.handleResult)
	mux.HandleFunc("/arrivals", f.handleArrivals)
	mux.HandleFunc("/close", f.handleClose)
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, serverStats{CPUNanos: childproc.CPUNanos()}, nil)
	})
	mux.HandleFunc("/floor/open", f.floor.handleOpen)
	mux.HandleFunc("/floor/wait", f.floor.handleWait)
	mux.HandleFunc("/floor/close", f.floor.handleClose)
	ctl, stop, err := serveControl(mux)
	if err != nil {
		sayHello(hello{Err: "clients: " + err.Error()})
		return 1
	}
	sayHello(hello{Ctl: ctl})
	childproc.WaitForParent(childLifetime)
	stop()
	f.closeAll(5 * time.Second)
	f.floor.closeAll()
	return 0
}

// openResult is /open's answer.
type openResult struct {
	Opened   int     `json:"opened"`
	Errors   int     `json:"errors"`
	Subs     int     `json:"subs"` // subscriptions of the opened connections
	FirstErr string  `json:"first_error,omitempty"`
	Ms       float64 `json:"ms"`
}

// dialers is how many connections are opened at once.
const dialers = 32

// maxClients bounds one row's connections (parseRows enforces it too).
const maxClients = 20000

// subscriptionPlan says which entities each of conns connections
// subscribes to: every entity 1..keys gets between minSubs and maxSubs
// subscribers (uniformly, at most conns), on distinct connections picked
// at random; the same seed gives the same plan. One key with
// minSubs = maxSubs = conns is the peer phase: every connection on it.
func subscriptionPlan(conns, keys, minSubs, maxSubs int, seed uint64) [][]int {
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	plan := make([][]int, conns)
	for k := 1; k <= keys; k++ {
		s := min(conns, minSubs+rng.IntN(maxSubs-minSubs+1))
		if 2*s > conns {
			for _, c := range rng.Perm(conns)[:s] {
				plan[c] = append(plan[c], k)
			}
			continue
		}
		picked := make(map[int]bool, s)
		for len(picked) < s {
			c := rng.IntN(conns)
			if !picked[c] {
				picked[c] = true
				plan[c] = append(plan[c], k)
			}
		}
	}
	return plan
}

// /open?proto=seed|api|cf&url=ws://...&n=1000&keys=1&min=1000&max=1000&seed=1
// dials n connections to url, subscribes each to its entities of the
// subscription plan and waits for every subscription's confirmation; each
// connection then runs the shared read loop.
func (f *fleet) handleOpen(w http.ResponseWriter, r *http.Request) {
	protoName := r.URL.Query().Get("proto")
	proto, err := protocolFor(protoName)
	if err != nil {
		writeJSON(w, nil, err)
		return
	}
	target, n := r.URL.Query().Get("url"), intParam(r, "n", 0)
	keys, minSubs, maxSubs := intParam(r, "keys", 1), intParam(r, "min", n), intParam(r, "max", n)
	if n <= 0 || n > maxClients || keys <= 0 || keys > maxKeys || minSubs <= 0 || maxSubs < minSubs {
		writeJSON(w, nil, fmt.Errorf("need 0 < n <= %d, 0 < keys <= %d, 0 < min <= max", maxClients, maxKeys))
		return
	}
	plan := subscriptionPlan(n, keys, minSubs, maxSubs, uint64(intParam(r, "seed", 1)))
	ctx, cancel := context.WithTimeout(r.Context(), timeoutParam(r, time.Minute))
	defer cancel()
	start := time.Now()
	f.rec.closing.Store(false)
	dialer := f.dialer
	dialer.Subprotocols = proto.subprotocols()
	var (
		next     atomic.Int64
		firstErr atomic.Value
		wg       sync.WaitGroup
		opened   = make([]*wsClient, n)
	)
	for range dialers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				c, err := f.dial(ctx, &dialer, target, proto, plan[i])
				if err != nil {
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				opened[i] = c
			}
		})
	}
	wg.Wait()
	res := openResult{Ms: msSince(start)}
	f.mu.Lock()
	for _, c := range opened {
		if c != nil {
			f.conns = append(f.conns, c)
			res.Opened++
			res.Subs += len(c.keys)
		}
	}
	f.mu.Unlock()
	res.Errors = n - res.Opened
	if s, ok := firstErr.Load().(string); ok {
		res.FirstErr = s
	}
	writeJSON(w, res, nil)
}

func (f *fleet) dial(ctx context.Context, dialer *websocket.Dialer, target string, proto protocol, keys []int) (*wsClient, error) {
	ws, resp, err := dialer.DialContext(ctx, target, nil)
	if resp != nil && resp.Body != nil {
		resp.Body.Close()
	}
	if err != nil {
		return nil, err
	}
	initial, err := proto.handshake(ws, keys)
	if err != nil {
		ws.Close()
		return nil, err
	}
	c := newWSClient(ws, proto, keys, initial)
	f.readers.Add(1)
	go c.read(&f.rec, f.readers.Done)
	return c, nil
}

func msSince(t time.Time) float64 { return float64(time.Since(t).Microseconds()) / 1000 }

func (f *fleet) snapshot() []*wsClient {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.conns
}

// /record clears every connection's arrivals and starts recording.
func (f *fleet) handleRecord(w http.ResponseWriter, _ *http.Request) {
	for _, c := range f.snapshot() {
		c.mu.Lock()
		c.arrivals, c.frames = c.arrivals[:0], 0
		c.mu.Unlock()
	}
	f.rec.recording.Store(true)
	writeJSON(w, struct{}{}, nil)
}

// waitResult is /wait's answer.
type waitResult struct {
	OK     bool    `json:"ok"`
	Behind int     `json:"behind"` // live (connection, entity) pairs below the entity's last version
	Dead   int     `json:"dead"`   // connections whose read loop failed
	Ms     float64 `json:"ms"`
}

// /wait, with a JSON body {"12": 42, ...} (entity id: version), waits until
// every live connection holds at least that version of each of those
// entities it subscribed to; the read loops timestamp arrivals, so polling
// only decides when to stop.
func (f *fleet) handleWait(w http.ResponseWriter, r *http.Request) {
	var want map[int]int64
	if err := json.NewDecoder(r.Body).Decode(&want); err != nil {
		writeJSON(w, nil, err)
		return
	}
	deadline := time.Now().Add(timeoutParam(r, 30*time.Second))
	conns := f.snapshot()
	start := time.Now()
	var res waitResult
	for {
		res = waitResult{}
		for _, c := range conns {
			if c.dead.Load() {
				res.Dead++
				continue
			}
			for i, k := range c.keys {
				if v, ok := want[k]; ok && c.maxV[i].Load() < v {
					res.Behind++
				}
			}
		}
		if res.Behind == 0 || time.Now().After(deadline) || r.Context().Err() != nil {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	res.OK = res.Behind == 0 && res.Dead == 0
	res.Ms = msSince(start)
	writeJSON(w, res, nil)
}

// rowResult is /result's answer: what the clients saw of the row.
type rowResult struct {
	Conns      int    `json:"conns"`
	Expected   int64  `json:"expected"`  // (subscriber, change) pairs: the states asked for
	Updates    int64  `json:"updates"`   // messages carrying one of the row's versions
	WSFrames   int64  `json:"ws_frames"` // websocket frames that carried them
	Missing    int64  `json:"missing"`   // (subscriber, change) pairs never visible
	P50        int64  `json:"p50_ns"`
	P99        int64  `json:"p99_ns"`
	Max        int64  `json:"max_ns"`
	Dead       int    `json:"dead"`
	ReadErrors int64  `json:"read_errors"`
	Backwards  int64  `json:"backwards"`
	Strays     int64  `json:"strays"`
	Others     int64  `json:"others"` // messages without a version
	FirstErr   string `json:"first_error,omitempty"`
}

// /result, with the row's changes as its JSON body, stops recording and
// turns every connection's arrivals into the row's deliveries and visible
// latencies.
func (f *fleet) handleResult(w http.ResponseWriter, r *http.Request) {
	var changes []change
	if err := json.NewDecoder(r.Body).Decode(&changes); err != nil {
		writeJSON(w, nil, err)
		return
	}
	f.rec.recording.Store(false)
	byKey := groupChanges(changes)
	conns := f.snapshot()
	res := rowResult{Conns: len(conns)}
	var samples []int64
	for _, c := range conns {
		c.mu.Lock()
		perKey := make([][]arrival, len(c.keys))
		for _, a := range c.arrivals {
			i := c.slot[a.id]
			perKey[i] = append(perKey[i], a)
		}
		for i, k := range c.keys {
			kc := byKey[k]
			if kc == nil {
				continue
			}
			var missing, delivered int
			samples, missing, delivered = visibleLatencies(samples, perKey[i], kc)
			res.Expected += int64(len(kc.vs))
			res.Missing += int64(missing)
			res.Updates += int64(delivered)
		}
		res.WSFrames += c.frames
		c.mu.Unlock()
		if c.dead.Load() {
			res.Dead++
		}
	}
	res.P50, res.P99, res.Max = percentiles(samples)
	res.ReadErrors = f.rec.readErrors.Load()
	res.Backwards = f.rec.backwards.Load()
	res.Strays = f.rec.strays.Load()
	res.Others = f.rec.others.Load()
	if s := f.rec.firstErr.Load(); s != nil {
		res.FirstErr = *s
	}
	writeJSON(w, res, nil)
}

// /arrivals returns every connection's recorded arrivals, as (version,
// UnixNano) pairs, by the connection's local address (the server's view of
// the client's address): the breakdown phase matches them with the
// server's socket writes.
func (f *fleet) handleArrivals(w http.ResponseWriter, _ *http.Request) {
	res := make(map[string][][2]int64)
	for _, c := range f.snapshot() {
		c.mu.Lock()
		as := make([][2]int64, len(c.arrivals)) // the breakdown's one key
		for i, a := range c.arrivals {
			as[i] = [2]int64{a.v, a.at}
		}
		c.mu.Unlock()
		res[c.ws.LocalAddr().String()] = as
	}
	writeJSON(w, res, nil)
}

// /close closes every websocket connection and resets the counters for the
// next row.
func (f *fleet) handleClose(w http.ResponseWriter, r *http.Request) {
	n, err := f.closeAll(timeoutParam(r, 20*time.Second))
	writeJSON(w, map[string]int{"closed": n}, err)
}

func (f *fleet) closeAll(timeout time.Duration) (int, error) {
	f.mu.Lock()
	conns := f.conns
	f.conns = nil
	f.mu.Unlock()
	f.rec.closing.Store(true)
	f.rec.recording.Store(false)
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
	for _, c := range conns {
		// The close frame races the read loop's keep-alive answers;
		// WriteControl is safe alongside one other writer.
		_ = c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
		_ = c.ws.Close()
	}
	done := make(chan struct{})
	go func() { f.readers.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-time.After(timeout):
		err = errors.New("read loops still running after close")
	}
	f.rec.readErrors.Store(0)
	f.rec.backwards.Store(0)
	f.rec.strays.Store(0)
	f.rec.others.Store(0)
	f.rec.firstErr.Store(nil)
	return len(conns), err
}
