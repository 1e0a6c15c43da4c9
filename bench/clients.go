//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/internal/childproc"
)

// clientsHello is the clients process's first stdout line.
type clientsHello struct {
	Ctl string `json:"ctl"`
	Err string `json:"err,omitempty"`
}

// fleet is the clients process's set of websocket connections.
type fleet struct {
	servers []string
	dialer  websocket.Dialer

	mu    sync.Mutex
	conns []*bconn

	readers    sync.WaitGroup
	recording  atomic.Bool
	readErrors atomic.Int64
	badFrames  atomic.Int64
	backwards  atomic.Int64 // a key's version went down on one connection
	firstErr   atomic.Value // string
}

// bconn is one websocket connection and what it received.
type bconn struct {
	ws     *websocket.Conn
	server int
	wmu    sync.Mutex // one writer at a time
	closed atomic.Bool

	mu     sync.Mutex
	keys   map[string]*seen
	subs   []string // the keys a -cluster connection watches
	frames int64
	lat    []int64 // notify -> receive, ns, while recording
}

// seen is the newest version of a key a connection received.
type seen struct{ v, at int64 }

func runClients(cfg config) int {
	f := &fleet{
		servers: strings.Split(cfg.servers, ","),
		dialer: websocket.Dialer{
			HandshakeTimeout: 10 * time.Second,
			ReadBufferSize:   512,
			WriteBufferSize:  512,
		},
	}
	hello := clientsHello{}
	if cfg.servers == "" && !cfg.cluster {
		hello.Err = "clients: -servers is required"
		_ = json.NewEncoder(os.Stdout).Encode(hello)
		return 1
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		hello.Err = err.Error()
		_ = json.NewEncoder(os.Stdout).Encode(hello)
		return 1
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/open", f.handleOpen)
	mux.HandleFunc("/subscribe", f.handleSubscribe)
	mux.HandleFunc("/wait", f.handleWait)
	mux.HandleFunc("/record", f.handleRecord)
	mux.HandleFunc("/closeall", f.handleCloseAll)
	mux.HandleFunc("/stats", f.handleStats)
	mux.HandleFunc("/csubscribe", f.handleClusterSubscribe)
	mux.HandleFunc("/cwait", f.handleClusterWait)
	coll := newCollFleet(f.servers)
	coll.routes(mux)
	mux.Handle("/debug/pprof/", http.DefaultServeMux)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }()
	hello.Ctl = "http://" + l.Addr().String()
	if err := json.NewEncoder(os.Stdout).Encode(hello); err != nil {
		return 1
	}
	childproc.WaitForParent(childLifetime)
	_ = srv.Close()
	f.closeAll(5 * time.Second)
	coll.closeAll()
	return 0
}

func (f *fleet) noteErr(err error) {
	f.firstErr.CompareAndSwap(nil, err.Error())
}

func timeoutParam(r *http.Request, def time.Duration) time.Duration {
	if ms, err := strconv.Atoi(r.URL.Query().Get("timeout_ms")); err == nil && ms > 0 {
		return time.Duration(ms) * time.Millisecond
	}
	return def
}

func intParam(r *http.Request, name string, def int) int {
	if v, err := strconv.Atoi(r.URL.Query().Get(name)); err == nil {
		return v
	}
	return def
}

type openResult struct {
	Opened   int     `json:"opened"`
	Total    int     `json:"total"`
	Errors   int     `json:"errors"`
	FirstErr string  `json:"first_error,omitempty"`
	Ms       float64 `json:"ms"`
}

// /open?n=1000 dials n more connections, connection i (counting all ever
// opened and still held) to server i % len(servers).
func (f *fleet) handleOpen(w http.ResponseWriter, r *http.Request) {
	n := intParam(r, "n", 0)
	ctx, cancel := context.WithTimeout(r.Context(), timeoutParam(r, 60*time.Second))
	defer cancel()
	start := time.Now()
	f.mu.Lock()
	base := len(f.conns)
	f.mu.Unlock()
	opened := make([]*bconn, n)
	errs, firstErr := parallel(ctx, n, func(i int) error {
		server := (base + i) % len(f.servers)
		ws, resp, err := f.dialer.DialContext(ctx, f.servers[server], nil)
		if resp != nil && resp.Body != nil {
			resp.Body.Close()
		}
		if err != nil {
			return err
		}
		c := &bconn{ws: ws, server: server, keys: make(map[string]*seen, 2)}
		opened[i] = c
		f.readers.Add(1)
		go f.read(c)
		return nil
	})
	f.mu.Lock()
	for _, c := range opened {
		if c != nil {
			f.conns = append(f.conns, c)
		}
	}
	total := len(f.conns)
	f.mu.Unlock()
	res := openResult{Opened: n - errs, Total: total, Errors: errs, FirstErr: firstErr, Ms: msSince(start)}
	if ctx.Err() != nil {
		res.Opened = 0
		for _, c := range opened {
			if c != nil {
				res.Opened++
			}
		}
		res.Errors = n - res.Opened
	}
	writeJSON(w, res)
}

// parallel calls do(i) for every i in [0, n) from 32 goroutines, stopping
// early when ctx ends, and returns how many calls failed and the first
// error: how the clients process dials many connections at once.
func parallel(ctx context.Context, n int, do func(i int) error) (errs int, firstErr string) {
	var (
		failed atomic.Int64
		first  atomic.Value
		next   atomic.Int64
		wg     sync.WaitGroup
	)
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := do(i); err != nil {
					failed.Add(1)
					first.CompareAndSwap(nil, err.Error())
				}
			}
		}()
	}
	wg.Wait()
	s, _ := first.Load().(string)
	return int(failed.Load()), s
}

func msSince(t time.Time) float64 { return float64(time.Since(t).Microseconds()) / 1000 }

// read consumes one connection's frames: rows of the bench entity.
func (f *fleet) read(c *bconn) {
	defer f.readers.Done()
	buf := make([]byte, 0, 256)
	for {
		_, rd, err := c.ws.NextReader()
		if err != nil {
			if !c.closed.Load() {
				f.readErrors.Add(1)
				f.noteErr(fmt.Errorf("read: %w", err))
			}
			return
		}
		buf, err = readAll(rd, buf[:0])
		now := time.Now().UnixNano()
		if err != nil {
			if !c.closed.Load() {
				f.readErrors.Add(1)
				f.noteErr(fmt.Errorf("read frame: %w", err))
			}
			return
		}
		id, v, t, ok := parseRow(buf)
		if !ok {
			f.badFrames.Add(1)
			f.noteErr(fmt.Errorf("unexpected frame %.100q", buf))
			continue
		}
		c.mu.Lock()
		if s := c.keys[string(id)]; s != nil {
			if v < s.v {
				f.backwards.Add(1)
			} else {
				s.v, s.at = v, now
			}
		} else {
			c.keys[string(id)] = &seen{v: v, at: now}
		}
		if f.recording.Load() {
			c.frames++
			if t > 0 {
				c.lat = append(c.lat, now-t)
			}
		}
		c.mu.Unlock()
	}
}

func readAll(r io.Reader, buf []byte) ([]byte, error) {
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}

// parseRow extracts id, v and t from a row appendRow made, without a JSON
// decoder (the clients process shares the machine's two cores with the
// servers, so its per-frame cost is kept small).
func parseRow(b []byte) (id []byte, v, t int64, ok bool) {
	field := func(name string) []byte {
		i := bytes.Index(b, []byte(name))
		if i < 0 {
			return nil
		}
		rest := b[i+len(name):]
		j := bytes.IndexAny(rest, ",}\"")
		if j < 0 {
			return nil
		}
		return rest[:j]
	}
	id = field(`"id":"`)
	vb, tb := field(`"v":`), field(`"t":`)
	if id == nil || vb == nil || tb == nil {
		return nil, 0, 0, false
	}
	var err1, err2 error
	v, err1 = strconv.ParseInt(string(vb), 10, 64)
	t, err2 = strconv.ParseInt(string(tb), 10, 64)
	return id, v, t, err1 == nil && err2 == nil
}

// slice returns the connections [from, to) (to < 0: all).
func (f *fleet) slice(r *http.Request) []*bconn {
	f.mu.Lock()
	defer f.mu.Unlock()
	from, to := intParam(r, "from", 0), intParam(r, "to", -1)
	if to < 0 || to > len(f.conns) {
		to = len(f.conns)
	}
	from = min(max(from, 0), to)
	return slices.Clone(f.conns[from:to])
}

// keysFor returns the key each of n connections (within the request's
// range) is about: id, or id+i with each=1.
func keysFor(r *http.Request, n int) []string {
	id := r.URL.Query().Get("id")
	each := r.URL.Query().Get("each") == "1"
	keys := make([]string, n)
	for i := range keys {
		keys[i] = id
		if each {
			keys[i] = id + strconv.Itoa(i)
		}
	}
	return keys
}

type subscribeResult struct {
	N        int     `json:"n"`
	Missing  int     `json:"missing"` // connections without the initial state at the timeout
	Errors   int     `json:"errors"`
	FirstErr string  `json:"first_error,omitempty"`
	Ms       float64 `json:"ms"`
}

// /subscribe?id=hot&from=0&to=1000[&each=1] subscribes the connections and
// waits until each has received the key's initial state.
func (f *fleet) handleSubscribe(w http.ResponseWriter, r *http.Request) {
	conns := f.slice(r)
	deadline := time.Now().Add(timeoutParam(r, 30*time.Second))
	start := time.Now()
	keys := keysFor(r, len(conns))
	res := subscribeResult{N: len(conns)}
	for i, c := range conns {
		msg := `{"action":"subscribe","body":{"entity":"` + entity + `","id":` + strconv.Quote(keys[i]) + `}}`
		c.wmu.Lock()
		_ = c.ws.SetWriteDeadline(time.Now().Add(5 * time.Second))
		err := c.ws.WriteMessage(websocket.TextMessage, []byte(msg))
		c.wmu.Unlock()
		if err != nil {
			res.Errors++
			if res.FirstErr == "" {
				res.FirstErr = err.Error()
			}
		}
	}
	for {
		res.Missing = 0
		for i, c := range conns {
			c.mu.Lock()
			if c.keys[keys[i]] == nil {
				res.Missing++
			}
			c.mu.Unlock()
		}
		if res.Missing == 0 || time.Now().After(deadline) || r.Context().Err() != nil {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	res.Ms = msSince(start)
	writeJSON(w, res)
}

type waitResult struct {
	OK        bool    `json:"ok"`
	Behind    int     `json:"behind"`    // connections below the version at the end
	Converged int64   `json:"converged"` // UnixNano when the last connection got a version >= v
	MinV      int64   `json:"min_v"`
	Ms        float64 `json:"ms"`
}

// /wait?id=hot&v=42&from=0&to=1000 waits until every connection in range
// holds version >= v of the key.
func (f *fleet) handleWait(w http.ResponseWriter, r *http.Request) {
	conns := f.slice(r)
	keys := keysFor(r, len(conns))
	want, _ := strconv.ParseInt(r.URL.Query().Get("v"), 10, 64)
	deadline := time.Now().Add(timeoutParam(r, 30*time.Second))
	start := time.Now()
	res := waitResult{}
	for {
		res.Behind, res.Converged, res.MinV = 0, 0, -1
		for i, c := range conns {
			c.mu.Lock()
			s := c.keys[keys[i]]
			switch {
			case s == nil || s.v < want:
				res.Behind++
				if s == nil {
					res.MinV = 0
				} else if res.MinV < 0 || s.v < res.MinV {
					res.MinV = s.v
				}
			case s.at > res.Converged:
				res.Converged = s.at
			}
			c.mu.Unlock()
		}
		if res.Behind == 0 || time.Now().After(deadline) || r.Context().Err() != nil {
			break
		}
		time.Sleep(2 * time.Millisecond) // readers timestamp arrivals; polling only ends the wait
	}
	res.OK = res.Behind == 0
	if res.MinV < 0 {
		res.MinV = want
	}
	res.Ms = msSince(start)
	writeJSON(w, res)
}

type recordResult struct {
	Frames  int64 `json:"frames"`
	Samples int   `json:"samples"`
	P50     int64 `json:"p50_ns"`
	P99     int64 `json:"p99_ns"`
	Max     int64 `json:"max_ns"`
}

// /record?on=1 clears the counters and starts recording; /record?on=0 stops
// and returns frames received and latency percentiles.
func (f *fleet) handleRecord(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	conns := slices.Clone(f.conns)
	f.mu.Unlock()
	on := r.URL.Query().Get("on") == "1"
	if on {
		for _, c := range conns {
			c.mu.Lock()
			c.frames, c.lat = 0, c.lat[:0]
			c.mu.Unlock()
		}
		f.recording.Store(true)
		writeJSON(w, recordResult{})
		return
	}
	f.recording.Store(false)
	res := recordResult{}
	var all []int64
	for _, c := range conns {
		c.mu.Lock()
		res.Frames += c.frames
		all = append(all, c.lat...)
		c.mu.Unlock()
	}
	slices.Sort(all)
	res.Samples = len(all)
	if len(all) > 0 {
		res.P50 = all[len(all)*50/100]
		res.P99 = all[min(len(all)-1, len(all)*99/100)]
		res.Max = all[len(all)-1]
	}
	writeJSON(w, res)
}

// /closeall closes every connection (close frame, then the socket) and waits
// for their readers.
func (f *fleet) handleCloseAll(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	n, err := f.closeAll(timeoutParam(r, 20*time.Second))
	res := map[string]any{"closed": n, "ms": msSince(start)}
	if err != nil {
		res["error"] = err.Error()
	}
	writeJSON(w, res)
}

func (f *fleet) closeAll(timeout time.Duration) (int, error) {
	f.mu.Lock()
	conns := f.conns
	f.conns = nil
	f.mu.Unlock()
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
	for _, c := range conns {
		c.closed.Store(true)
		c.wmu.Lock()
		_ = c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
		c.wmu.Unlock()
		_ = c.ws.Close()
	}
	done := make(chan struct{})
	go func() { f.readers.Wait(); close(done) }()
	select {
	case <-done:
		return len(conns), nil
	case <-time.After(timeout):
		return len(conns), errors.New("readers still running")
	}
}

type clientStats struct {
	Conns      int       `json:"conns"`
	ReadErrors int64     `json:"read_errors"`
	BadFrames  int64     `json:"bad_frames"`
	Backwards  int64     `json:"backwards"`
	FirstErr   string    `json:"first_error,omitempty"`
	Proc       procStats `json:"proc"`
}

func (f *fleet) handleStats(w http.ResponseWriter, _ *http.Request) {
	f.mu.Lock()
	n := len(f.conns)
	f.mu.Unlock()
	res := clientStats{
		Conns:      n,
		ReadErrors: f.readErrors.Load(),
		BadFrames:  f.badFrames.Load(),
		Backwards:  f.backwards.Load(),
		Proc:       readProc(false),
	}
	if s, ok := f.firstErr.Load().(string); ok {
		res.FirstErr = s
	}
	writeJSON(w, res)
}
