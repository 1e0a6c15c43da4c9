//go:build linux

package main

// The collection comparison (go run ./bench -collections): what a
// collection key costs on the wire when one row of it changes, sent as a
// diff or in full, and what 1,000 clients reconnecting while holding it
// cost with and without resume (a subscribe carrying the version held).
//
// The servers process runs two servers on the embedded nsqd, both serving
// the collection "coll" (collRows rows of about 100 bytes, one key,
// "coll/1"); server 1 has esweb.Options.DisableDiffs, so its clients get
// every state in full. The clients process speaks the envelope protocol,
// keeps each connection's version (checking every diff's base against it)
// and counts the bytes each connection reads from its socket: frames and
// their websocket headers, plus the HTTP upgrade for a new connection.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/internal/childproc"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/shared"
)

// collEntity is the collection's entity type; every phase uses its key "1".
const collEntity = "coll"

// --- servers process ---

// collStore is the collection's rows, shared by both servers.
type collStore struct {
	mu   sync.Mutex
	rows []collRow
	rng  *rand.Rand
}

type collRow struct {
	ID    string `json:"id"`
	Title string `json:"title"`
	Done  bool   `json:"done"`
	Rev   int    `json:"rev"`
}

func newCollStore(n int) *collStore {
	s := &collStore{rng: rand.New(rand.NewPCG(1, 2))}
	for i := range n {
		s.rows = append(s.rows, collRow{ID: "item-" + strconv.Itoa(i), Title: fmt.Sprintf("task %04d: %s", i, strings.Repeat("x", 40))})
	}
	return s
}

func (s *collStore) fetch(context.Context, shared.EntityKey) ([][]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([][]byte, len(s.rows))
	for i, r := range s.rows {
		out[i], _ = json.Marshal(r)
	}
	return out, nil
}

// change changes one random row and returns the collection's new version.
func (s *collStore) change() string {
	s.mu.Lock()
	r := &s.rows[s.rng.IntN(len(s.rows))]
	r.Rev++
	r.Done = !r.Done
	s.mu.Unlock()
	rows, _ := s.fetch(context.Background(), shared.EntityKey{})
	return shared.Version(rows)
}

// serve registers the collection on es and adds /ctl/coll/change (change
// one row, notify, answer {"version": ...}) and /ctl/coll/version.
func (s *collStore) serve(es *entitysync.EntitySync) error {
	if err := es.RegisterCollection(collEntity, s.fetch, esdb.JSONField("id")); err != nil {
		return fmt.Errorf("register collection: %w", err)
	}
	key := shared.EntityKey{Entity: collEntity, ID: "1"}
	es.Mux.HandleFunc("/ctl/coll/change", func(w http.ResponseWriter, _ *http.Request) {
		v := s.change()
		if err := es.NotifyAllOfChange(key); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, map[string]string{"version": v})
	})
	es.Mux.HandleFunc("/ctl/coll/version", func(w http.ResponseWriter, _ *http.Request) {
		rows, _ := s.fetch(context.Background(), key)
		writeJSON(w, map[string]any{"version": shared.Version(rows), "rows": len(rows)})
	})
	return nil
}

// --- clients process ---

// collFleet is the clients process's envelope connections to the
// collection, in named groups.
type collFleet struct {
	servers []string
	dialer  websocket.Dialer

	mu     sync.Mutex
	groups map[string][]*collConn

	mismatches atomic.Int64 // diffs whose base was not the version held
	readErrors atomic.Int64
	firstErr   atomic.Value // string
}

// collConn is one connection and what it holds.
type collConn struct {
	server int
	ws     *websocket.Conn
	read   atomic.Int64 // bytes read from the socket
	closed atomic.Bool
	done   chan struct{} // closed when the reader returns

	mu      sync.Mutex
	version string
	frames  map[string]int // by type
}

func newCollFleet(servers []string) *collFleet {
	return &collFleet{servers: servers, groups: make(map[string][]*collConn),
		dialer: websocket.Dialer{HandshakeTimeout: 10 * time.Second, Subprotocols: []string{shared.Subprotocol}}}
}

func (f *collFleet) routes(mux *http.ServeMux) {
	mux.HandleFunc("/coll/open", f.handleOpen)
	mux.HandleFunc("/coll/close", f.handleClose)
	mux.HandleFunc("/coll/wait", f.handleWait)
	mux.HandleFunc("/coll/reset", f.handleReset)
	mux.HandleFunc("/coll/stats", func(w http.ResponseWriter, _ *http.Request) {
		m, e, first := f.stats()
		writeJSON(w, collClientStats{Mismatches: m, ReadErrors: e, FirstErr: first})
	})
}

func (f *collFleet) noteErr(err error) { f.firstErr.CompareAndSwap(nil, err.Error()) }

// dial opens one connection to server and subscribes to the collection,
// with version when it is not "".
func (f *collFleet) dial(ctx context.Context, server int, version string) (*collConn, error) {
	c := &collConn{server: server, version: version, frames: make(map[string]int), done: make(chan struct{})}
	d := f.dialer
	d.NetDialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &countingConn{Conn: nc, n: &c.read}, nil
	}
	ws, resp, err := d.DialContext(ctx, f.servers[server], nil)
	if resp != nil && resp.Body != nil {
		resp.Body.Close()
	}
	if err != nil {
		return nil, err
	}
	c.ws = ws
	body := map[string]string{"entity": collEntity, "id": "1"}
	if version != "" {
		body["version"] = version
	}
	msg, _ := json.Marshal(map[string]any{"action": "subscribe", "body": body})
	_ = ws.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if err := ws.WriteMessage(websocket.TextMessage, msg); err != nil {
		ws.Close()
		return nil, err
	}
	go f.read(c)
	return c, nil
}

// read consumes a connection's frames, keeping its version.
func (f *collFleet) read(c *collConn) {
	defer close(c.done)
	for {
		_, b, err := c.ws.ReadMessage()
		if err != nil {
			if !c.closed.Load() {
				f.readErrors.Add(1)
				f.noteErr(fmt.Errorf("read: %w", err))
			}
			return
		}
		// The fields that matter come first in every state frame; a real
		// client decodes the rows too, this one only counts them.
		head := b[:min(len(b), 300)]
		typ := field(head, `"type":"`)
		c.mu.Lock()
		c.frames[typ]++
		switch typ {
		case "rows", "gone", "unchanged":
			c.version = field(head, `"version":"`)
		case "diff":
			if base := field(head, `"base":"`); base != c.version {
				f.mismatches.Add(1)
				f.noteErr(fmt.Errorf("diff from %s, connection holds %s", base, c.version))
			}
			c.version = field(head, `"version":"`)
		}
		c.mu.Unlock()
	}
}

// field returns the string after prefix in b, up to the next quote.
func field(b []byte, prefix string) string {
	i := bytes.Index(b, []byte(prefix))
	if i < 0 {
		return ""
	}
	rest := b[i+len(prefix):]
	if j := bytes.IndexByte(rest, '"'); j >= 0 {
		return string(rest[:j])
	}
	return ""
}

type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.n.Add(int64(n))
	return n, err
}

type collOpenResult struct {
	Opened   int     `json:"opened"`
	Errors   int     `json:"errors"`
	FirstErr string  `json:"first_error,omitempty"`
	Ms       float64 `json:"ms"` // until every connection held the version wanted (or any, without v)
	Bytes    int64   `json:"bytes"`
	Frames   map[string]int
	Behind   int `json:"behind"`
}

// /coll/open?group=g&n=1000&server=0[&resume=1][&v=version] dials n
// connections into group g (replacing what it held: with resume=1 each new
// connection subscribes with the version its predecessor held) and waits
// until each holds version v (any version without v). It reports the bytes
// the new connections read, handshakes included.
func (f *collFleet) handleOpen(w http.ResponseWriter, r *http.Request) {
	group, n, server := r.URL.Query().Get("group"), intParam(r, "n", 0), intParam(r, "server", 0)
	resume, want := r.URL.Query().Get("resume") == "1", r.URL.Query().Get("v")
	ctx, cancel := context.WithTimeout(r.Context(), timeoutParam(r, 60*time.Second))
	defer cancel()
	f.mu.Lock()
	old := f.groups[group]
	f.mu.Unlock()
	if len(old) > 0 {
		n = len(old)
	}
	start := time.Now()
	opened := make([]*collConn, n)
	errs, firstErr := parallel(ctx, n, func(i int) error {
		version, srv := "", server
		if i < len(old) {
			srv = old[i].server
			if resume {
				old[i].mu.Lock()
				version = old[i].version
				old[i].mu.Unlock()
			}
		}
		c, err := f.dial(ctx, srv, version)
		opened[i] = c
		return err
	})
	var conns []*collConn
	for _, c := range opened {
		if c != nil {
			conns = append(conns, c)
		}
	}
	res := collOpenResult{Opened: len(conns), Errors: errs, FirstErr: firstErr}
	res.Behind = awaitVersion(ctx, conns, want, resume)
	res.Ms = msSince(start)
	res.Bytes, res.Frames = readSoFar(conns)
	f.mu.Lock()
	f.groups[group] = conns
	f.mu.Unlock()
	writeJSON(w, res)
}

// awaitVersion waits until every connection holds want (any version when
// want is ""; with resumed, a resumed connection already holds one before
// the server answers, so it waits for an answer frame too). It returns how
// many do not at the end.
func awaitVersion(ctx context.Context, conns []*collConn, want string, resumed bool) int {
	for {
		behind := 0
		for _, c := range conns {
			c.mu.Lock()
			answered := c.frames["rows"]+c.frames["gone"]+c.frames["diff"]+c.frames["unchanged"] > 0
			ok := c.version != "" && (want == "" || c.version == want) && (answered || !resumed)
			c.mu.Unlock()
			if !ok {
				behind++
			}
		}
		if behind == 0 || ctx.Err() != nil {
			return behind
		}
		time.Sleep(time.Millisecond) // polling ends the wait; readers record what arrives
	}
}

func readSoFar(conns []*collConn) (int64, map[string]int) {
	var n int64
	frames := make(map[string]int)
	for _, c := range conns {
		n += c.read.Load()
		c.mu.Lock()
		for t, k := range c.frames {
			frames[t] += k
		}
		c.mu.Unlock()
	}
	return n, frames
}

// /coll/close?group=g closes the group's connections (a close frame, then
// the socket) and waits for their readers; the group remembers them for a
// later /coll/open with resume.
func (f *collFleet) handleClose(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	conns := f.groups[r.URL.Query().Get("group")]
	f.mu.Unlock()
	closeColl(conns)
	writeJSON(w, map[string]int{"closed": len(conns)})
}

func closeColl(conns []*collConn) {
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
	for _, c := range conns {
		if c.closed.Swap(true) {
			continue
		}
		_ = c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
		_ = c.ws.Close()
	}
	for _, c := range conns {
		<-c.done
	}
}

// /coll/reset?group=g zeroes the group's byte and frame counters.
func (f *collFleet) handleReset(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	conns := f.groups[r.URL.Query().Get("group")]
	f.mu.Unlock()
	for _, c := range conns {
		c.read.Store(0)
		c.mu.Lock()
		clear(c.frames)
		c.mu.Unlock()
	}
	writeJSON(w, map[string]int{"reset": len(conns)})
}

// /coll/wait?group=g&v=version waits until the group holds version and
// reports its counters.
func (f *collFleet) handleWait(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	conns := f.groups[r.URL.Query().Get("group")]
	f.mu.Unlock()
	ctx, cancel := context.WithTimeout(r.Context(), timeoutParam(r, 30*time.Second))
	defer cancel()
	start := time.Now()
	res := collOpenResult{Opened: len(conns)}
	res.Behind = awaitVersion(ctx, conns, r.URL.Query().Get("v"), false)
	res.Ms = msSince(start)
	res.Bytes, res.Frames = readSoFar(conns)
	writeJSON(w, res)
}

func (f *collFleet) stats() (mismatches, readErrors int64, firstErr string) {
	s, _ := f.firstErr.Load().(string)
	return f.mismatches.Load(), f.readErrors.Load(), s
}

func (f *collFleet) closeAll() {
	f.mu.Lock()
	var all []*collConn
	for _, g := range f.groups {
		all = append(all, g...)
	}
	f.mu.Unlock()
	closeColl(all)
}

// --- orchestrator ---

type collClientStats struct {
	Mismatches int64  `json:"mismatches"`
	ReadErrors int64  `json:"read_errors"`
	FirstErr   string `json:"first_error,omitempty"`
}

func runCollections(cfg config) int {
	start := time.Now()
	host := readHost()
	o := &orchestrator{cfg: cfg, http: &http.Client{}}
	code := 0
	defer func() {
		o.printCollections(time.Since(start), host)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), cfg.budget)
	defer cancel()
	o.budget = ctx

	broker, err := nsqtest.Embed()
	if err != nil {
		o.fail("setup: embedded nsqd", err)
		return 1
	}
	defer broker.Close()
	servers, err := childproc.Spawn("servers", 30*time.Second, &o.servers, "-nsqd", broker.TCPAddr(), "-collections", "-coll-rows", fmt.Sprint(cfg.collRows))
	defer func() { _ = servers.Stop() }()
	if err != nil {
		o.fail("setup: servers process", err)
		return 1
	}
	clients, err := childproc.Spawn("clients", 30*time.Second, &o.clients, "-servers", strings.Join(o.servers.WS, ","))
	defer func() { _ = clients.Stop() }()
	if err != nil {
		o.fail("setup: clients process", err)
		return 1
	}

	o.timed("one row changed: diff vs full", func() { o.phaseCollChange(ctx) })
	o.timed("reconnect with and without resume", func() { o.phaseCollReconnect(ctx) })

	var cs collClientStats
	if err := o.call(ctx, 10*time.Second, o.clients.Ctl, "/coll/stats", nil, &cs); err != nil {
		o.notes = append(o.notes, "clients stats: "+err.Error())
	} else {
		v := fmt.Sprintf("%d (read errors %d)", cs.Mismatches, cs.ReadErrors)
		if cs.FirstErr != "" {
			v += "; first error: " + oneLine(cs.FirstErr)
		}
		o.add("diffs whose base was not the version the connection held (whole run)", v, "0")
		if cs.Mismatches > 0 {
			code = 1
		}
	}
	for _, r := range o.rows {
		if strings.HasPrefix(r.value, "ERROR") {
			code = 1
		}
	}
	return code
}

func (o *orchestrator) collOpen(ctx context.Context, group string, n, server int, resume bool, want string) (collOpenResult, error) {
	var res collOpenResult
	query := q("group", group, "n", n, "server", server, "v", want)
	if resume {
		query.Set("resume", "1")
	}
	err := o.call(ctx, 90*time.Second, o.clients.Ctl, "/coll/open", query, &res)
	if err == nil && (res.Errors > 0 || res.Behind > 0) {
		err = fmt.Errorf("%d of %d connections failed (%s), %d without the state after %.0f ms", res.Errors, res.Opened+res.Errors, res.FirstErr, res.Behind, res.Ms)
	}
	return res, err
}

func (o *orchestrator) collWait(ctx context.Context, group, v string) (collOpenResult, error) {
	var res collOpenResult
	err := o.call(ctx, 30*time.Second, o.clients.Ctl, "/coll/wait", q("group", group, "v", v), &res)
	if err == nil && res.Behind > 0 {
		err = fmt.Errorf("%d of %d connections of %s below version %s after %.0f ms", res.Behind, res.Opened, group, v, res.Ms)
	}
	return res, err
}

func (o *orchestrator) collChange(ctx context.Context) (string, error) {
	var res struct{ Version string }
	err := o.call(ctx, 10*time.Second, o.servers.Ctl[0], "/ctl/coll/change", nil, &res)
	return res.Version, err
}

// phaseCollChange: collClients connections on each server, collChanges
// changes of one row each, every one waited for on all connections; bytes
// read per connection per change, diffs (server 0) against full states
// (server 1, DisableDiffs).
func (o *orchestrator) phaseCollChange(ctx context.Context) {
	n, k := o.cfg.collClients, o.cfg.collChanges
	metric := fmt.Sprintf("one row of the %d-row collection changed: bytes a client reads per change (%d changes, %d clients on each server)", o.cfg.collRows, k, n)
	first, err := o.collOpen(ctx, "diff", n, 0, false, "")
	if err == nil {
		_, err = o.collOpen(ctx, "full", n, 1, false, "")
	}
	if err != nil {
		o.fail(metric, err)
		return
	}
	for _, g := range []string{"diff", "full"} {
		var r map[string]int
		if err := o.call(ctx, 10*time.Second, o.clients.Ctl, "/coll/reset", q("group", g), &r); err != nil {
			o.fail(metric, err)
			return
		}
	}
	var res [2]collOpenResult
	for i := 0; i < k; i++ {
		v, err := o.collChange(ctx)
		if err != nil {
			o.fail(metric, err)
			return
		}
		for j, g := range []string{"diff", "full"} {
			if res[j], err = o.collWait(ctx, g, v); err != nil {
				o.fail(metric, fmt.Errorf("change %d: %w", i+1, err))
				return
			}
		}
	}
	per := func(r collOpenResult) float64 { return float64(r.Bytes) / float64(k) / float64(r.Opened) }
	d, f := per(res[0]), per(res[1])
	o.add(metric, fmt.Sprintf("diff: **%.0f B** (%d diff frames); full state: **%.0f B** (%d rows frames); %.0fx less with diffs. First state in full: %.0f B per client (upgrade, welcome, state)",
		d, res[0].Frames["diff"], f, res[1].Frames["rows"], f/d, float64(first.Bytes)/float64(first.Opened)), "")
}

// phaseCollReconnect: collReconnect connections on server 0 holding the
// collection drop and reconnect at once, without and with resume, and with
// resume after one row changed while they were away.
func (o *orchestrator) phaseCollReconnect(ctx context.Context) {
	n := o.cfg.collReconnect
	name := func(how string) string {
		return fmt.Sprintf("%d clients holding the %d-row collection reconnect at once, %s: bytes read (upgrade included), time until all hold the state, servers CPU", n, o.cfg.collRows, how)
	}
	var v struct{ Version string }
	if err := o.call(ctx, 10*time.Second, o.servers.Ctl[0], "/ctl/coll/version", nil, &v); err != nil {
		o.fail(name("setup"), err)
		return
	}
	if _, err := o.collOpen(ctx, "many", n, 0, false, v.Version); err != nil {
		o.fail(name("setup"), err)
		return
	}
	run := func(how string, resume, change bool) {
		metric := name(how)
		var r map[string]int
		if err := o.call(ctx, 60*time.Second, o.clients.Ctl, "/coll/close", q("group", "many"), &r); err != nil {
			o.fail(metric, err)
			return
		}
		want := v.Version
		if change {
			var err error
			if want, err = o.collChange(ctx); err != nil {
				o.fail(metric, err)
				return
			}
			// The "diff" group keeps the key on server 0, and with it the
			// state the reconnecting clients hold: once it has the change,
			// so has the server.
			if _, err := o.collWait(ctx, "diff", want); err != nil {
				o.fail(metric, err)
				return
			}
			v.Version = want
		}
		before, err := o.stats(ctx, false)
		if err != nil {
			o.fail(metric, err)
			return
		}
		res, err := o.collOpen(ctx, "many", n, 0, resume, want)
		if err != nil {
			o.fail(metric, err)
			return
		}
		after, err := o.stats(ctx, false)
		if err != nil {
			o.fail(metric, err)
			return
		}
		cpu := time.Duration(after[0].Proc.CPUNanos - before[0].Proc.CPUNanos)
		var frames []string
		for _, t := range []string{"rows", "diff", "unchanged"} {
			if res.Frames[t] > 0 {
				frames = append(frames, fmt.Sprintf("%d %s", res.Frames[t], t))
			}
		}
		o.add(metric, fmt.Sprintf("**%.2f MB** (%.0f B per client; %s); **%.0f ms**; servers CPU %.2f s",
			float64(res.Bytes)/1e6, float64(res.Bytes)/float64(res.Opened), strings.Join(frames, ", "), res.Ms, cpu.Seconds()), "")
	}
	run("without resume (subscribe without a version)", false, false)
	run("with resume (subscribe with the version held; nothing changed)", true, false)
	run("with resume, one row changed while they were away", true, true)
}

func (o *orchestrator) printCollections(total time.Duration, host hostSample) {
	end := readHost()
	var b strings.Builder
	b.WriteString("\n| metric | value |\n| --- | --- |\n")
	for _, r := range o.rows {
		fmt.Fprintf(&b, "| %s | %s |\n", r.metric, r.value)
	}
	fmt.Fprintf(&b, "\ncommand: `%s`; %s %s/%s, GOMAXPROCS=%d, NumCPU=%d; nsqd v1.3.0 embedded in the orchestrator, 2 servers in one process (server 1 with DisableDiffs), clients in another, all on 127.0.0.1; rows of about %d bytes; total %.1fs\n",
		strings.Join(append([]string{"go run ./bench"}, os.Args[1:]...), " "), runtime.Version(), runtime.GOOS, runtime.GOARCH,
		runtime.GOMAXPROCS(0), runtime.NumCPU(), collRowBytes(), total.Seconds())
	if len(o.timings) > 0 {
		fmt.Fprintf(&b, "phases: %s\n", strings.Join(o.timings, ", "))
	}
	if span := end.total - host.total; span > 0 {
		fmt.Fprintf(&b, "host during the run: load average %s at start, %s at end; CPU busy %.0f%% of the %d cores' capacity, this benchmark's processes %.0f%%\n",
			host.loadavg, end.loadavg, 100*(end.busy-host.busy)/span, runtime.NumCPU(), 100*(end.own-host.own)/span)
	}
	for _, n := range o.notes {
		fmt.Fprintf(&b, "note: %s\n", n)
	}
	fmt.Print(b.String())
}

// collRowBytes is the size of a typical row of the collection.
func collRowBytes() int {
	rows, _ := newCollStore(1).fetch(context.Background(), shared.EntityKey{})
	return len(rows[0])
}
