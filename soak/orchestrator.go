//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Margins of the end-of-run resource check, against the level measured
// after warm-up and before the first fault (both after a GC that returns
// free memory to the OS):
//   - goroutines not explained by connections (goroutines minus the
//     per-connection count measured at warm-up times the server's current
//     clients) at most goroutineMargin more than before;
//   - RSS not explained by connections (likewise, with the per-connection
//     RSS measured at warm-up) at most rssFactor times its level before
//     plus rssSlack.
//
// Clients do not return to a restarted server, so a server may end with
// twice its clients or none: both are counted per connection.
const (
	goroutineMargin = 20
	rssFactor       = 1.25
	rssSlack        = 8 << 20
)

// store is the servers' shared database: one version per key, held by the
// orchestrator and read over HTTP, so a fetch returns the latest version at
// fetch time.
type store struct {
	mu       sync.Mutex
	versions []int64
	lastBump time.Time
	bumps    int64
	last     []bump // per key, its last change: for diagnosing a stale key
}

// bump is one change of a key in the store.
type bump struct {
	at time.Time
	by string // the server's listen address
}

func (s *store) serveHTTP(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("id")
	k, err := strconv.Atoi(strings.TrimPrefix(id, "k"))
	s.mu.Lock()
	if err != nil || !strings.HasPrefix(id, "k") || k < 0 || k >= len(s.versions) {
		s.mu.Unlock()
		http.Error(w, "no such key "+strconv.Quote(id), http.StatusNotFound)
		return
	}
	if r.URL.Path == "/bump" {
		s.versions[k]++
		s.bumps++
		s.lastBump = time.Now()
		if s.last == nil {
			s.last = make([]bump, len(s.versions))
		}
		s.last[k] = bump{at: s.lastBump, by: r.URL.Query().Get("by")}
	}
	v := s.versions[k]
	s.mu.Unlock()
	writeJSON(w, row{ID: id, V: v})
}

func (s *store) snapshot() ([]int64, time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int64(nil), s.versions...), s.lastBump
}

// faultKind is one kind of fault and how many times it is injected.
type faultKind struct {
	name  string
	desc  string
	count int
	span  time.Duration // how long one occurrence lasts, for placing it
	run   func(ctx context.Context, rng *rand.Rand) (string, error)

	injected atomic.Int64
	failed   atomic.Int64
	mu       sync.Mutex
	notes    []string
}

type orchestrator struct {
	cfg   config
	dir   string
	store *store
	hc    *http.Client
	start time.Time
	logf  func(format string, args ...any)

	lookupd     *proc
	lookupdTCP  string
	lookupdHTTP string
	nsqds       []*proc
	nsqdTCP     []string
	servers     []*proc
	serverURL   []string
	serverLock  []sync.Mutex // one fault at a time per server
	clients     *proc
	clientsCtl  string
	nextNSQD    int // the nsqd the next nsqd-kill fault hits (-1: pick one)

	statsMu sync.Mutex
	// per server, per pid: the last stats read from that incarnation
	incarnations []map[int]serverStats

	writes, writeErrors, renotified, notifyLost atomic.Int64

	lagMu sync.Mutex
	lag   lagStats
}

// lagStats summarizes the lag samples taken during the run: how many
// subscriptions held a version older than the store's of lagBehind before.
type lagStats struct {
	samples, lagging int        // samples taken, of which with any lagging subscription
	worst            int        // the most lagging subscriptions in one sample
	worstAt          float64    // seconds into the run
	worstOf          int        // subscriptions in that sample
	worstOn          []int      // of which per server the client was connected to
	worstOff         int        // and of clients not connected
	longest          float64    // the longest run of consecutive lagging samples, in seconds
	runStart         *time.Time // when the current run of lagging samples began
}

// lagBehind is how far behind the store a subscription may be before a lag
// sample counts it: a change normally reaches clients in milliseconds.
const lagBehind = 3 * time.Second

func runOrchestrator(cfg config) int {
	if cfg.seed == 0 {
		cfg.seed = time.Now().UnixNano() % 1_000_000
	}
	o := &orchestrator{cfg: cfg, nextNSQD: -1, hc: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 32}}}
	o.logf = func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "soak %6.1fs: %s\n", time.Since(o.start).Seconds(), fmt.Sprintf(format, args...))
	}
	o.start = time.Now()
	code, err := o.run()
	if err != nil {
		fmt.Fprintf(os.Stderr, "soak: FAIL: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	o.shutdown()
	if code == 0 && cfg.logDir == "" {
		_ = os.RemoveAll(o.dir)
	} else if o.dir != "" {
		fmt.Fprintf(os.Stderr, "soak: logs kept in %s\n", o.dir)
	}
	return code
}

func (o *orchestrator) run() (int, error) {
	cfg := o.cfg
	// A watchdog: whatever happens, the run ends (children die with us).
	limit := cfg.duration + cfg.quiet + 4*time.Minute
	go func() {
		time.Sleep(limit)
		fmt.Fprintf(os.Stderr, "soak: FAIL: still running after %s; killing everything\n", limit)
		os.Exit(3)
	}()

	if cfg.faults != "all" && cfg.faults != "none" {
		known := map[string]bool{}
		for _, k := range o.allFaultKinds() {
			known[k.name] = true
		}
		for _, name := range strings.Split(cfg.faults, ",") {
			if !known[name] {
				return 2, fmt.Errorf("-faults: unknown fault kind %q", name)
			}
		}
	}
	var err error
	if cfg.logDir != "" {
		o.dir = cfg.logDir
		err = os.MkdirAll(o.dir, 0o755)
	} else {
		o.dir, err = os.MkdirTemp("", "entity-sync-soak.")
	}
	if err != nil {
		return 1, err
	}
	bin, err := filepath.Abs(cfg.bin)
	if err != nil {
		return 1, err
	}
	for _, b := range []string{"nsqd", "nsqlookupd"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			return 2, fmt.Errorf("%s not found in %s: run `make nsq` first (or pass -bin)", b, bin)
		}
	}
	exe, err := os.Executable()
	if err != nil {
		return 1, err
	}
	o.logf("seed %d; logs in %s", cfg.seed, o.dir)

	// The store.
	o.store = &store{versions: make([]int64, cfg.keys)}
	for i := range o.store.versions {
		o.store.versions[i] = 1
	}
	sl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 1, err
	}
	go func() { _ = http.Serve(sl, http.HandlerFunc(o.store.serveHTTP)) }()
	storeURL := "http://" + sl.Addr().String()

	ports, err := freePorts(2 + 2*2 + cfg.servers)
	if err != nil {
		return 1, err
	}
	addr := func(i int) string { return "127.0.0.1:" + strconv.Itoa(ports[i]) }
	o.lookupdTCP, o.lookupdHTTP = addr(0), addr(1)
	o.lookupd = &proc{name: "nsqlookupd", path: filepath.Join(bin, "nsqlookupd"), log: logPath(o.dir, "nsqlookupd"),
		args: []string{"--tcp-address=" + o.lookupdTCP, "--http-address=" + o.lookupdHTTP, "--broadcast-address=127.0.0.1"}}
	if err := o.startLookupd(); err != nil {
		return 1, err
	}
	for i := range 2 {
		tcp, httpAddr := addr(2+2*i), addr(3+2*i)
		data := filepath.Join(o.dir, fmt.Sprintf("nsqd%d", i+1))
		if err := os.MkdirAll(data, 0o755); err != nil {
			return 1, err
		}
		p := &proc{name: fmt.Sprintf("nsqd%d", i+1), path: filepath.Join(bin, "nsqd"), log: logPath(o.dir, fmt.Sprintf("nsqd%d", i+1)),
			args: []string{"--tcp-address=" + tcp, "--http-address=" + httpAddr, "--broadcast-address=127.0.0.1",
				"--lookupd-tcp-address=" + o.lookupdTCP, "--data-path=" + data}}
		o.nsqds = append(o.nsqds, p)
		o.nsqdTCP = append(o.nsqdTCP, tcp)
		if err := o.startNSQD(i); err != nil {
			return 1, err
		}
	}
	o.incarnations = make([]map[int]serverStats, cfg.servers)
	o.serverLock = make([]sync.Mutex, cfg.servers)
	for i := range cfg.servers {
		listen := addr(6 + i)
		// Each server publishes to "its" nsqd first, the other one next.
		nsqd := o.nsqdTCP[i%2] + "," + o.nsqdTCP[(i+1)%2]
		p := &proc{name: fmt.Sprintf("server%d", i+1), path: exe, log: logPath(o.dir, fmt.Sprintf("server%d", i+1)),
			args: []string{"-role=server", "-listen=" + listen, "-nsqd=" + nsqd, "-lookupd=" + o.lookupdHTTP, "-store=" + storeURL}}
		o.servers = append(o.servers, p)
		o.serverURL = append(o.serverURL, "http://"+listen)
		o.incarnations[i] = map[int]serverStats{}
	}
	var wg sync.WaitGroup
	errs := make([]error, cfg.servers)
	for i := range o.servers {
		wg.Go(func() { errs[i] = o.startServer(i) })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return 1, err
		}
	}
	o.logf("nsqlookupd, 2 nsqd and %d servers up", cfg.servers)
	time.Sleep(time.Second)
	bare := o.readAllStats(true) // goroutines with no client

	// The clients.
	o.clients = &proc{name: "clients", path: exe, log: logPath(o.dir, "clients"),
		args: []string{"-role=clients", "-server-urls=" + strings.Join(o.serverURL, ","),
			"-clients=" + strconv.Itoa(cfg.clients), "-keys=" + strconv.Itoa(cfg.keys),
			"-keys-per-client=" + strconv.Itoa(cfg.perClient), "-churn=" + strconv.Itoa(cfg.churn),
			"-seed=" + strconv.FormatInt(cfg.seed, 10)}}
	var hello clientsHello
	if err := o.clients.start(&hello, time.Minute); err != nil {
		return 1, err
	}
	o.clientsCtl = hello.Ctl

	// Warm-up: every client connected and holding the store's state.
	warm, _, err := o.waitConverged(time.Minute)
	if err != nil {
		return 1, fmt.Errorf("warm-up: %w", err)
	}
	o.logf("warm-up: %d clients connected, %d subscriptions at the store's version", warm.Connected, warm.Matched)
	base := o.readAllStats(true)
	perConn, perConnRSS := perConnection(bare, base)
	for i := range bare {
		if bare[i] != nil && base[i] != nil {
			o.logf("server%d: %d goroutines with no client, %d with %d clients (RSS %.1f, %.1f MiB)", i+1,
				bare[i].Goroutines, base[i].Goroutines, base[i].Bridge.Clients, mib(bare[i].RSS), mib(base[i].RSS))
		}
	}

	// The run: writers, faults and misbehaving clients, then quiet.
	// Writers write for cfg.duration and until the last fault is over, so
	// the quiet period starts with everything up and running.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pollCtx, stopPoll := context.WithCancel(context.Background())
	defer stopPoll()
	var pollWG sync.WaitGroup
	pollWG.Go(func() { o.pollStats(pollCtx) })
	kinds := o.faultKinds()
	pollWG.Go(func() { o.sampleLag(pollCtx) })
	var writeWG, faultWG sync.WaitGroup
	master := rand.New(rand.NewPCG(uint64(cfg.seed), 1))
	for w := range 4 {
		seed := master.Uint64()
		writeWG.Go(func() { o.writer(ctx, w, 4, seed) })
	}
	runStart := time.Now()
	for _, k := range kinds {
		times := o.place(master, k)
		seed := master.Uint64()
		faultWG.Go(func() { o.inject(runStart, k, times, seed) })
	}
	time.Sleep(cfg.duration)
	faultWG.Wait()
	if over := time.Since(runStart) - cfg.duration; over > time.Second {
		o.logf("the last fault ended %.1fs after the planned end of the run", over.Seconds())
	}
	cancel()
	writeWG.Wait()
	o.logf("writes stopped: %d writes (%d failed and were notified through another server)", o.writes.Load(), o.writeErrors.Load())
	if err := o.post(o.clientsCtl+"/quiet", nil, nil, 5*time.Second); err != nil {
		return 1, fmt.Errorf("clients /quiet: %w", err)
	}

	final, convergeAfter, cerr := o.waitConverged(cfg.quiet)
	if cerr != nil {
		o.logf("convergence: %v", cerr)
	}
	// Let the servers drop what the misbehaving clients left, then measure.
	time.Sleep(3 * time.Second)
	stopPoll()
	pollWG.Wait()
	end := o.readAllStats(true)
	o.recordStats(end)
	final2, err := o.check()
	if err == nil {
		final = final2
	}
	ok := o.report(final, cerr == nil, convergeAfter, kinds, base, end, perConn, perConnRSS)
	if !ok {
		return 1, nil
	}
	return 0, nil
}

func (o *orchestrator) shutdown() {
	var wg sync.WaitGroup
	if o.clients != nil {
		wg.Go(func() { o.clients.stop(20 * time.Second) })
	}
	wg.Wait()
	for _, s := range o.servers {
		wg.Go(func() { s.stop(20 * time.Second) })
	}
	wg.Wait()
	for _, n := range o.nsqds {
		wg.Go(func() { n.stop(10 * time.Second) })
	}
	if o.lookupd != nil {
		wg.Go(func() { o.lookupd.stop(10 * time.Second) })
	}
	wg.Wait()
}

func (o *orchestrator) startLookupd() error {
	if err := o.lookupd.start(nil, 0); err != nil {
		return err
	}
	return waitTCP(o.lookupdTCP, 20*time.Second)
}

func (o *orchestrator) startNSQD(i int) error {
	if err := o.nsqds[i].start(nil, 0); err != nil {
		return err
	}
	return waitTCP(o.nsqdTCP[i], 20*time.Second)
}

// startServer starts server i and waits until it serves the entity type.
func (o *orchestrator) startServer(i int) error {
	if err := o.servers[i].start(nil, 0); err != nil {
		return err
	}
	deadline := time.Now().Add(90 * time.Second)
	for {
		var st serverStats
		if err := o.post(o.serverURL[i]+"/stats", nil, &st, 2*time.Second); err == nil && st.Ready {
			return nil
		}
		if o.servers[i].exited() {
			return fmt.Errorf("server%d exited while starting (log: %s)", i+1, o.servers[i].log)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("server%d not ready after 90s (log: %s)", i+1, o.servers[i].log)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// post POSTs body (JSON, if not nil) to u and decodes the answer into out.
func (o *orchestrator) post(u string, body, out any, timeout time.Duration) error {
	return postWith(o.hc, u, body, out, timeout)
}

func postWith(hc *http.Client, u string, body, out any, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, rd)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("%s: %s: %s", u, resp.Status, strings.TrimSpace(string(b)))
	}
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// readAllStats reads every server's stats (nil entry: unreachable).
func (o *orchestrator) readAllStats(gc bool) []*serverStats {
	out := make([]*serverStats, len(o.servers))
	hc := o.hc
	if gc {
		// Idle keep-alive connections cost the servers a goroutine each:
		// close them, and ask over a connection that closes.
		o.hc.CloseIdleConnections()
		time.Sleep(200 * time.Millisecond)
		hc = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	}
	var wg sync.WaitGroup
	for i := range o.servers {
		wg.Go(func() {
			u := o.serverURL[i] + "/stats"
			if gc {
				u += "?gc=1"
			}
			var st serverStats
			if err := postWith(hc, u, nil, &st, 10*time.Second); err == nil {
				out[i] = &st
			}
		})
	}
	wg.Wait()
	return out
}

func (o *orchestrator) recordStats(all []*serverStats) {
	o.statsMu.Lock()
	defer o.statsMu.Unlock()
	for i, st := range all {
		if st != nil {
			o.incarnations[i][st.PID] = *st
		}
	}
}

// pollStats keeps the last stats of every server incarnation, so counters
// of a killed server still count.
func (o *orchestrator) pollStats(ctx context.Context) {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		o.recordStats(o.readAllStats(false))
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// perConnection estimates the goroutines and RSS bytes a server spends per
// connected client, from the servers with no client and with the warm-up's
// clients.
func perConnection(bare, base []*serverStats) (goroutines, rss float64) {
	var dg, dc int
	var dr int64
	for i := range bare {
		if bare[i] == nil || base[i] == nil {
			continue
		}
		dg += base[i].Goroutines - bare[i].Goroutines
		dr += base[i].RSS - bare[i].RSS
		dc += base[i].Bridge.Clients - bare[i].Bridge.Clients
	}
	if dc <= 0 {
		return 0, 0
	}
	return float64(dg) / float64(dc), max(0, float64(dr)/float64(dc))
}

// writer changes random keys through random servers until ctx ends, at
// rate/n writes a second. A write a server did not confirm (killed,
// stopped, broker trouble) is notified again through another server, as an
// application would retry: the store may have been bumped.
func (o *orchestrator) writer(ctx context.Context, w, n int, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, uint64(w)))
	interval := time.Duration(float64(time.Second) * float64(n) / float64(max(1, o.cfg.rate)))
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		id := keyID(rng.IntN(o.cfg.keys))
		s := rng.IntN(len(o.servers))
		o.writes.Add(1)
		if err := o.post(o.serverURL[s]+"/write?id="+id, nil, nil, 3*time.Second); err == nil {
			continue
		}
		o.writeErrors.Add(1)
		notified := false
		for j := 1; j < len(o.servers)*3 && !notified; j++ { // each other server, up to 3 rounds
			other := (s + j) % len(o.servers)
			if other == s {
				continue
			}
			if err := o.post(o.serverURL[other]+"/notify?id="+id, nil, nil, 3*time.Second); err == nil {
				notified = true
			}
		}
		if notified {
			o.renotified.Add(1)
		} else {
			o.notifyLost.Add(1)
		}
	}
}

// check asks the clients process to compare what its clients hold with the
// store.
func (o *orchestrator) check() (checkResult, error) {
	versions, _ := o.store.snapshot()
	var res checkResult
	err := o.post(o.clientsCtl+"/check", checkRequest{Versions: versions}, &res, 20*time.Second)
	return res, err
}

func (res checkResult) converged() bool {
	return res.Connected == res.Clients && res.Subscriptions > 0 && res.Matched == res.Subscriptions
}

// waitConverged polls the clients until every one is connected and holds
// the store's version of every key it subscribes to, for at most timeout.
// It returns the last check and how long after the store's last change it
// converged.
func (o *orchestrator) waitConverged(timeout time.Duration) (checkResult, time.Duration, error) {
	deadline := time.Now().Add(timeout)
	var res checkResult
	var err error
	for {
		res, err = o.check()
		_, last := o.store.snapshot()
		if err == nil && res.converged() {
			// The store may have changed after the check read it: only a
			// check that started after the last change counts.
			return res, time.Since(last), nil
		}
		if time.Now().After(deadline) {
			if err != nil {
				return res, 0, err
			}
			return res, 0, fmt.Errorf("not converged after %s: %d/%d clients connected, %d/%d subscriptions at the store's version (%d stale, %d missing); e.g. %s",
				timeout, res.Connected, res.Clients, res.Matched, res.Subscriptions, res.Stale, res.Missing, strings.Join(res.StaleExamples, "; "))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// sampleLag checks every 2 s how many subscriptions are more than
// lagBehind behind the store, until ctx ends.
func (o *orchestrator) sampleLag(ctx context.Context) {
	type snap struct {
		at       time.Time
		versions []int64
	}
	var hist []snap
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	lastSample := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		v, _ := o.store.snapshot()
		now := time.Now()
		hist = append(hist, snap{now, v})
		// The newest snapshot at least lagBehind old.
		i := -1
		for j := range hist {
			if now.Sub(hist[j].at) >= lagBehind {
				i = j
			}
		}
		if i < 0 || now.Sub(lastSample) < 2*time.Second {
			continue
		}
		old := hist[i]
		hist = hist[i:]
		lastSample = now
		var res checkResult
		if err := o.post(o.clientsCtl+"/check", checkRequest{Versions: old.versions}, &res, 10*time.Second); err != nil {
			continue
		}
		n := res.Stale + res.Missing
		o.lagMu.Lock()
		l := &o.lag
		l.samples++
		if n > 0 {
			l.lagging++
			if l.runStart == nil {
				l.runStart = &now
			}
			l.longest = max(l.longest, now.Sub(*l.runStart).Seconds()+2)
		} else {
			l.runStart = nil
		}
		if n > l.worst {
			l.worst, l.worstAt, l.worstOf = n, now.Sub(o.start).Seconds(), res.Subscriptions
			l.worstOn, l.worstOff = res.StaleOn, res.StaleOff
		}
		o.lagMu.Unlock()
	}
}

// --- faults ---

// faultKinds returns the fault kinds -faults selects.
func (o *orchestrator) faultKinds() []*faultKind {
	all := o.allFaultKinds()
	if o.cfg.faults == "all" || o.cfg.faults == "" {
		return all
	}
	var out []*faultKind
	for _, k := range all {
		if slices.Contains(strings.Split(o.cfg.faults, ","), k.name) {
			out = append(out, k)
		}
	}
	return out
}

// allFaultKinds returns every kind of fault, each with its count for the
// run's duration.
func (o *orchestrator) allFaultKinds() []*faultKind {
	d := o.cfg.duration
	count := func(every time.Duration) int { return max(2, int(d/every)) }
	mis := func(kind string, span time.Duration) func(ctx context.Context, rng *rand.Rand) (string, error) {
		return func(ctx context.Context, rng *rand.Rand) (string, error) {
			err := o.post(o.clientsCtl+"/misbehave?kind="+kind+"&for="+span.String(), nil, nil, 5*time.Second)
			sleepCtx(ctx, span)
			return "", err
		}
	}
	all := []*faultKind{
		{name: "server-kill", desc: "SIGKILL a server, start it again (its clients reconnect to the others)", count: count(20 * time.Second), span: 5 * time.Second, run: o.faultServerKill},
		{name: "nsqd-kill", desc: "SIGKILL an nsqd, start it again 1 s later", count: count(30 * time.Second), span: 3 * time.Second, run: o.faultNSQDKill},
		{name: "server-stop", desc: "SIGSTOP a server for 5 s, then SIGCONT", count: count(30 * time.Second), span: 6 * time.Second, run: o.faultServerStop},
		{name: "lookupd-down", desc: "SIGKILL nsqlookupd, start it again 20 s later", count: count(60 * time.Second), span: 21 * time.Second, run: o.faultLookupd},
		{name: "client-stuck", desc: "a client subscribes to every key and stops reading (4 KiB receive buffer) for 15 s", count: count(45 * time.Second), span: 15 * time.Second, run: mis("stuck", 15*time.Second)},
		{name: "client-flood", desc: "a client sends subscribe/unsubscribe requests as fast as the server takes them, for 10 s", count: count(45 * time.Second), span: 10 * time.Second, run: mis("flood", 10*time.Second)},
		{name: "client-churn", desc: "a client opens a connection, subscribes to 3 keys and drops it, 20 times a second for 10 s", count: count(45 * time.Second), span: 10 * time.Second, run: mis("churn", 10*time.Second)},
	}
	return all
}

// place returns when each occurrence of k starts, relative to the start of
// the run: the window (after a short lead-in, ending with the run) is cut
// into k.count equal slots and each occurrence starts at a random point of
// its slot that leaves it time to finish inside the slot.
func (o *orchestrator) place(rng *rand.Rand, k *faultKind) []time.Duration {
	lead := min(5*time.Second, o.cfg.duration/10)
	window := o.cfg.duration - lead
	slot := window / time.Duration(k.count)
	var out []time.Duration
	for i := range k.count {
		start := lead + time.Duration(i)*slot
		if free := slot - k.span; free > 0 {
			start += time.Duration(rng.Int64N(int64(free)))
		}
		out = append(out, start)
	}
	return out
}

func (o *orchestrator) inject(runStart time.Time, k *faultKind, times []time.Duration, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 7))
	for _, at := range times {
		time.Sleep(time.Until(runStart.Add(at)))
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		note, err := k.run(ctx, rng)
		cancel()
		if err != nil {
			k.failed.Add(1)
			o.logf("fault %s failed: %v", k.name, err)
			continue
		}
		k.injected.Add(1)
		if note != "" {
			k.mu.Lock()
			k.notes = append(k.notes, note)
			k.mu.Unlock()
		}
		if o.cfg.verbose {
			o.logf("fault %s done %s", k.name, note)
		}
	}
}

// lockServer picks a random server that no other fault holds.
func (o *orchestrator) lockServer(ctx context.Context, rng *rand.Rand) (int, error) {
	for {
		for _, i := range rng.Perm(len(o.servers)) {
			if o.serverLock[i].TryLock() {
				return i, nil
			}
		}
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		sleepCtx(ctx, 100*time.Millisecond)
	}
}

func (o *orchestrator) faultServerKill(ctx context.Context, rng *rand.Rand) (string, error) {
	i, err := o.lockServer(ctx, rng)
	if err != nil {
		return "", err
	}
	defer o.serverLock[i].Unlock()
	if err := o.servers[i].kill(); err != nil {
		return "", err
	}
	t := time.Now()
	if err := o.startServer(i); err != nil {
		return "", err
	}
	return fmt.Sprintf("server%d back in %.1fs", i+1, time.Since(t).Seconds()), nil
}

func (o *orchestrator) faultServerStop(ctx context.Context, rng *rand.Rand) (string, error) {
	i, err := o.lockServer(ctx, rng)
	if err != nil {
		return "", err
	}
	defer o.serverLock[i].Unlock()
	if err := o.servers[i].signal(syscall.SIGSTOP); err != nil {
		return "", err
	}
	sleepCtx(ctx, 5*time.Second)
	if err := o.servers[i].signal(syscall.SIGCONT); err != nil {
		return "", err
	}
	return fmt.Sprintf("server%d", i+1), nil
}

func (o *orchestrator) faultNSQDKill(ctx context.Context, rng *rand.Rand) (string, error) {
	// Each nsqd in turn, starting with a random one, so both are hit.
	if o.nextNSQD < 0 {
		o.nextNSQD = rng.IntN(len(o.nsqds))
	}
	i := o.nextNSQD
	o.nextNSQD = (i + 1) % len(o.nsqds)
	if err := o.nsqds[i].kill(); err != nil {
		return "", err
	}
	sleepCtx(ctx, time.Second)
	if err := o.startNSQD(i); err != nil {
		return "", err
	}
	return fmt.Sprintf("nsqd%d", i+1), nil
}

func (o *orchestrator) faultLookupd(ctx context.Context, _ *rand.Rand) (string, error) {
	if err := o.lookupd.kill(); err != nil {
		return "", err
	}
	sleepCtx(ctx, 20*time.Second)
	return "", o.startLookupd()
}

// --- report ---

// report prints the tables and returns whether every check passed.
func (o *orchestrator) report(res checkResult, converged bool, convergeAfter time.Duration, kinds []*faultKind, base, end []*serverStats, perConn, perConnRSS float64) bool {
	cfg := o.cfg
	allOK := true
	mark := func(ok bool) string {
		if !ok {
			allOK = false
			return "**FAIL**"
		}
		return "pass"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n### Soak: %d servers, 2 nsqd, 1 nsqlookupd, %d clients over %d keys, %s of writes and faults, seed %d\n\n",
		cfg.servers, cfg.clients, cfg.keys, cfg.duration, cfg.seed)

	fmt.Fprintf(&b, "| check | result | |\n| --- | --- | --- |\n")
	pct := 0.0
	if res.Subscriptions > 0 {
		pct = 100 * float64(res.Matched) / float64(res.Subscriptions)
	}
	convOK := converged && res.converged() && res.Ahead == 0 && res.BadRows == 0
	fmt.Fprintf(&b, "| every live client holds the store's final state of every key it subscribes to | %d/%d clients connected; %d/%d subscriptions at the store's version (%.2f%%), %d stale, %d missing, %d ahead, %d bad rows | %s |\n",
		res.Connected, res.Clients, res.Matched, res.Subscriptions, pct, res.Stale, res.Missing, res.Ahead, res.BadRows, mark(convOK))
	fmt.Fprintf(&b, "| no per-key order violation (per client, key and connection, versions only grow) | %d violations in %d rows received; %d reconnects | %s |\n",
		res.Violations, res.Rows, res.Reconnects, mark(res.Violations == 0))
	conv := "not converged"
	if converged {
		conv = fmt.Sprintf("%.2f s", convergeAfter.Seconds())
	}
	fmt.Fprintf(&b, "| time to converge after the last write | %s (limit %s) | %s |\n", conv, cfg.quiet, mark(converged))
	o.lagMu.Lock()
	l := o.lag
	o.lagMu.Unlock()
	worst := "none"
	if l.worst > 0 {
		var on []string
		for i, n := range l.worstOn {
			on = append(on, fmt.Sprintf("%d on server%d", n, i+1))
		}
		worst = fmt.Sprintf("worst %d of %d subscriptions (%.1f%%) at %.0f s: %s, %d of disconnected clients",
			l.worst, l.worstOf, 100*float64(l.worst)/float64(max(1, l.worstOf)), l.worstAt, strings.Join(on, ", "), l.worstOff)
	}
	fmt.Fprintf(&b, "| (information) subscriptions more than %s behind the store during the run, sampled every 2 s | %d of %d samples had some; %s; longest stretch of such samples about %.0f s | |\n",
		lagBehind, l.lagging, l.samples, worst, l.longest)
	errs := "none"
	if res.Errors > 0 {
		errs = fmt.Sprintf("%d, e.g. %s", res.Errors, strings.Join(res.ErrorEx[:min(3, len(res.ErrorEx))], "; "))
	}
	fmt.Fprintf(&b, "| no client request refused or failed (esclient errors) | %s | %s |\n", errs, mark(res.Errors == 0))
	fmt.Fprintf(&b, "| every write notified | %d writes at %d/s; %d not confirmed by their server and notified through another; %d not notified at all | %s |\n",
		o.writes.Load(), cfg.rate, o.writeErrors.Load(), o.notifyLost.Load(), mark(o.notifyLost.Load() == 0))
	faultsOK := true
	var fl []string
	for _, k := range kinds {
		if k.injected.Load() < int64(k.count) {
			faultsOK = false
		}
		fl = append(fl, fmt.Sprintf("%s %d/%d", k.name, k.injected.Load(), k.count))
	}
	if len(fl) == 0 {
		fl = append(fl, "none selected (-faults)")
	}
	fmt.Fprintf(&b, "| every fault injected | %s | %s |\n", strings.Join(fl, ", "), mark(faultsOK))
	for i := range o.servers {
		if base[i] == nil || end[i] == nil {
			fmt.Fprintf(&b, "| server%d goroutines and RSS back to their level | stats unavailable | %s |\n", i+1, mark(false))
			continue
		}
		otherBase := float64(base[i].Goroutines) - perConn*float64(base[i].Bridge.Clients)
		otherEnd := float64(end[i].Goroutines) - perConn*float64(end[i].Bridge.Clients)
		gOK := otherEnd <= otherBase+goroutineMargin
		rssBase := float64(base[i].RSS) - perConnRSS*float64(base[i].Bridge.Clients)
		rssEnd := float64(end[i].RSS) - perConnRSS*float64(end[i].Bridge.Clients)
		rssLimit := rssFactor*rssBase + rssSlack
		rOK := rssEnd <= rssLimit
		fmt.Fprintf(&b, "| server%d goroutines and RSS back to their level | goroutines %d → %d with %d → %d clients (%.0f → %.0f besides %.1f per client; limit +%d); RSS %.1f → %.1f MiB (%.1f → %.1f besides %.0f KiB per client; limit %.1f) | %s |\n",
			i+1, base[i].Goroutines, end[i].Goroutines, base[i].Bridge.Clients, end[i].Bridge.Clients, otherBase, otherEnd, perConn, goroutineMargin,
			mib(base[i].RSS), mib(end[i].RSS), rssBase/(1<<20), rssEnd/(1<<20), perConnRSS/1024, rssLimit/(1<<20), mark(gOK && rOK))
	}

	fmt.Fprintf(&b, "\n| fault | injected | what |\n| --- | --- | --- |\n")
	for _, k := range kinds {
		what := k.desc
		k.mu.Lock()
		if len(k.notes) > 0 {
			what += ": " + strings.Join(k.notes, ", ")
		}
		k.mu.Unlock()
		if f := k.failed.Load(); f > 0 {
			what += fmt.Sprintf(" (%d attempts failed, see the log above)", f)
		}
		fmt.Fprintf(&b, "| %s | %d | %s |\n", k.name, k.injected.Load(), what)
	}
	m := res.Misbehaved
	fmt.Fprintf(&b, "\nMisbehaving clients: stuck %d episodes (%d subscribes sent); flood %d episodes, %d requests written to the socket (the server reads them at its rate limit; the rest wait in socket buffers until the episode ends), %d connections closed by the server; churn %d episodes, %d connections opened and dropped; %d failed dials of these clients.\n",
		m.StuckEpisodes, m.StuckSubscribes, m.FloodEpisodes, m.FloodRequests, m.FloodDropped, m.ChurnEpisodes, m.ChurnConnections, m.DialErrors)

	// Notifications per server, over all its incarnations.
	o.statsMu.Lock()
	var allPub uint64
	type agg struct {
		starts                                            int
		pub, recv, fetches, deliveries, resyncs, overflow uint64
	}
	aggs := make([]agg, len(o.servers))
	for i, incs := range o.incarnations {
		aggs[i].starts = o.servers[i].starts
		for _, st := range incs {
			aggs[i].pub += st.Bridge.Notifications
			aggs[i].recv += st.Bridge.Received
			aggs[i].fetches += st.Bridge.Fetches
			aggs[i].deliveries += st.Bridge.Deliveries
			aggs[i].resyncs += st.Bridge.Resyncs
			aggs[i].overflow += st.Bridge.Overflows
		}
		allPub += aggs[i].pub
	}
	o.statsMu.Unlock()
	fmt.Fprintf(&b, "\n| server | processes | notifications published | received (of %d published by all) | fetches | deliveries | resyncs after loss | overflows | clients at the end |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n", allPub)
	for i, a := range aggs {
		clients := "?"
		if i < len(res.PerServer) {
			clients = strconv.Itoa(res.PerServer[i])
		}
		share := 0.0
		if allPub > 0 {
			share = 100 * float64(a.recv) / float64(allPub)
		}
		fmt.Fprintf(&b, "| server%d | %d | %d | %d (%.1f%%) | %d | %d | %d | %d | %s |\n", i+1, a.starts, a.pub, a.recv, share, a.fetches, a.deliveries, a.resyncs, a.overflow, clients)
	}
	fmt.Fprintf(&b, "\nCounters are summed over each server's processes as last read (every 0.5 s), so a killed process's last half second is missing. "+
		"A server receives fewer notifications than were published while it was down or stopped. "+
		"Resource margins: goroutines besides %.1f per connected client at most %d above the level before the faults; RSS besides %.0f KiB per connected client at most %.2f × its level before + %d MiB "+
		"(per-client costs measured between the servers with no client and after warm-up; RSS read after a GC that returns free memory to the OS). Clients do not move back to a restarted server, so a server may end with many more clients or none.\n",
		perConn, goroutineMargin, perConnRSS/1024, rssFactor, rssSlack>>20)
	if len(res.ViolationEx) > 0 {
		fmt.Fprintf(&b, "\nOrder violations (first %d): %s\n", len(res.ViolationEx), strings.Join(res.ViolationEx, "; "))
	}
	if len(res.StaleExamples) > 0 {
		fmt.Fprintf(&b, "\nNot converged (first %d; servers numbered from 0): %s\n", len(res.StaleExamples), strings.Join(res.StaleExamples, "; "))
		o.store.mu.Lock()
		for _, k := range res.StaleKeys {
			if k < 0 || k >= len(o.store.versions) || o.store.last == nil {
				continue
			}
			l := o.store.last[k]
			by := l.by
			for i, u := range o.serverURL {
				if u == "http://"+l.by {
					by = fmt.Sprintf("server%d", i+1)
				}
			}
			fmt.Fprintf(&b, "- key %s: version %d written through %s at %s (%.1f s into the run)\n",
				keyID(k), o.store.versions[k], by, l.at.UTC().Format("15:04:05.000"), l.at.Sub(o.start).Seconds())
		}
		o.store.mu.Unlock()
		o.printTraces(&b, res.StaleKeys)
	}
	if res.Errors > 0 {
		fmt.Fprintf(&b, "\nClient errors: %d (first %d: %s)\n", res.Errors, len(res.ErrorEx), strings.Join(res.ErrorEx, "; "))
	}
	fmt.Fprintf(&b, "\ncommand: `go run ./soak -duration %s -seed %d` (`make soak`); %s %s/%s, NumCPU=%d; %.0f s in all.\n",
		cfg.duration, cfg.seed, runtime.Version(), runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), time.Since(o.start).Seconds())
	if allOK {
		fmt.Fprintf(&b, "\nsoak: PASS\n")
	} else {
		fmt.Fprintf(&b, "\nsoak: FAIL\n")
	}
	fmt.Print(b.String())
	return allOK
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

// printTraces adds what each server recorded of the keys that did not
// converge (see keyTrace): the notifications it published and received, its
// fetches and rounds, the losses its queue reported and the last mark heard
// from each publisher.
func (o *orchestrator) printTraces(b *strings.Builder, keys []int) {
	for i, u := range o.serverURL {
		for _, k := range keys {
			var rep traceReport
			if err := o.post(u+"/trace?id="+keyID(k), nil, &rep, 2*time.Second); err != nil {
				fmt.Fprintf(b, "\nserver%d trace of %s: %v\n", i+1, keyID(k), err)
				continue
			}
			fmt.Fprintf(b, "\nserver%d trace of %s:\n  %s\n", i+1, keyID(k), strings.Join(rep.Events, "\n  "))
			if k == keys[0] {
				fmt.Fprintf(b, "server%d losses reported at: %s\nserver%d last marks: %v\n", i+1, strings.Join(rep.Losses, ", "), i+1, rep.Marks)
			}
		}
	}
}
