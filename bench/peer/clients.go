//go:build linux

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/internal/childproc"
)

// The clients process holds one row's connections at a time, all to one
// server: websocket clients of either system (the same dialer, the same
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
	FirstErr string  `json:"first_error,omitempty"`
	Ms       float64 `json:"ms"`
}

// dialers is how many connections are opened at once.
const dialers = 32

// maxClients bounds one row's connections (parseRows enforces it too).
const maxClients = 20000

// /open?proto=es|cf&url=ws://...&n=1000 dials n connections to url and
// does each one's handshake; each then runs the shared read loop.
func (f *fleet) handleOpen(w http.ResponseWriter, r *http.Request) {
	proto, err := protocolFor(r.URL.Query().Get("proto"))
	if err != nil {
		writeJSON(w, nil, err)
		return
	}
	target, n := r.URL.Query().Get("url"), intParam(r, "n", 0)
	if n <= 0 || n > maxClients {
		writeJSON(w, nil, fmt.Errorf("n must be in 1..%d", maxClients))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeoutParam(r, time.Minute))
	defer cancel()
	start := time.Now()
	f.rec.closing.Store(false)
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
				c, err := f.dial(ctx, target, proto)
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
		}
	}
	f.mu.Unlock()
	res.Errors = n - res.Opened
	if s, ok := firstErr.Load().(string); ok {
		res.FirstErr = s
	}
	writeJSON(w, res, nil)
}

func (f *fleet) dial(ctx context.Context, target string, proto protocol) (*wsClient, error) {
	ws, resp, err := f.dialer.DialContext(ctx, target, nil)
	if resp != nil && resp.Body != nil {
		resp.Body.Close()
	}
	if err != nil {
		return nil, err
	}
	v, err := proto.handshake(ws)
	if err != nil {
		ws.Close()
		return nil, err
	}
	c := &wsClient{ws: ws, proto: proto}
	c.maxV.Store(v)
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
	Behind int     `json:"behind"` // live connections below the version
	Dead   int     `json:"dead"`   // connections whose read loop failed
	MinV   int64   `json:"min_v"`  // the lowest version a live connection holds
	Ms     float64 `json:"ms"`
}

// /wait?v=42 waits until every live connection holds version >= v; the
// read loops timestamp arrivals, so polling only decides when to stop.
func (f *fleet) handleWait(w http.ResponseWriter, r *http.Request) {
	want := int64(intParam(r, "v", 0))
	deadline := time.Now().Add(timeoutParam(r, 30*time.Second))
	conns := f.snapshot()
	start := time.Now()
	var res waitResult
	for {
		res = waitResult{MinV: want}
		for _, c := range conns {
			switch v := c.maxV.Load(); {
			case c.dead.Load():
				res.Dead++
			case v < want:
				res.Behind++
				res.MinV = min(res.MinV, v)
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

// resultRequest is /result's body: the changes the row made.
type resultRequest struct {
	FirstV   int64   `json:"first_v"`
	NotifyNs []int64 `json:"notify_ns"`
}

// rowResult is /result's answer: what the clients saw of the row.
type rowResult struct {
	Conns      int    `json:"conns"`
	Updates    int64  `json:"updates"`   // messages carrying one of the row's versions
	WSFrames   int64  `json:"ws_frames"` // websocket frames that carried them
	Missing    int64  `json:"missing"`   // (client, change) pairs never visible
	P50        int64  `json:"p50_ns"`
	P99        int64  `json:"p99_ns"`
	Max        int64  `json:"max_ns"`
	Dead       int    `json:"dead"`
	ReadErrors int64  `json:"read_errors"`
	Backwards  int64  `json:"backwards"`
	Others     int64  `json:"others"` // messages without a version
	FirstErr   string `json:"first_error,omitempty"`
}

// /result stops recording and turns every connection's arrivals into the
// row's frame count and visible latencies.
func (f *fleet) handleResult(w http.ResponseWriter, r *http.Request) {
	var req resultRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeJSON(w, nil, err)
		return
	}
	f.rec.recording.Store(false)
	conns := f.snapshot()
	res := rowResult{Conns: len(conns)}
	samples := make([]int64, 0, len(conns)*len(req.NotifyNs))
	for _, c := range conns {
		c.mu.Lock()
		var missing int
		samples, missing = visibleLatencies(samples, c.arrivals, req.FirstV, req.NotifyNs)
		res.Missing += int64(missing)
		res.Updates += int64(countInRange(c.arrivals, req.FirstV, len(req.NotifyNs)))
		res.WSFrames += c.frames
		c.mu.Unlock()
		if c.dead.Load() {
			res.Dead++
		}
	}
	res.P50, res.P99, res.Max = percentiles(samples)
	res.ReadErrors = f.rec.readErrors.Load()
	res.Backwards = f.rec.backwards.Load()
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
		as := make([][2]int64, len(c.arrivals))
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
	f.rec.others.Store(0)
	f.rec.firstErr.Store(nil)
	return len(conns), err
}
