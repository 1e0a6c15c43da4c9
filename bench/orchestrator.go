//go:build linux

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/entity-sync/entity-sync/internal/childproc"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
)

// row is one line of the final table.
type row struct{ metric, value, target string }

type orchestrator struct {
	cfg     config
	budget  context.Context // ends when -budget runs out
	http    *http.Client
	servers serversHello
	clients clientsHello
	rows    []row
	timings []string
	notes   []string
	receive []string // -cluster: the receive-cost table's rows
}

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: %s "+format+"\n", append([]any{time.Now().Format("15:04:05.000")}, args...)...)
}

func runOrchestrator(cfg config) int {
	start := time.Now()
	o := &orchestrator{cfg: cfg, http: &http.Client{}}
	code := 0
	host := readHost()
	defer func() { o.print(time.Since(start), host) }()

	broker, err := nsqtest.Embed()
	if err != nil {
		o.fail("setup: embedded nsqd", err)
		return 1
	}
	defer broker.Close()
	nsqdAddr := broker.TCPAddr()
	progress("nsqd on %s", nsqdAddr)

	servers, err := childproc.Spawn("servers", 30*time.Second, &o.servers, "-nsqd", nsqdAddr)
	if err != nil {
		o.fail("setup: servers process", err)
		return 1
	}
	defer func() {
		if err := servers.Stop(); err != nil {
			o.notes = append(o.notes, "servers process exit: "+err.Error())
		}
	}()
	progress("servers %v", o.servers.WS)

	clients, err := childproc.Spawn("clients", 30*time.Second, &o.clients, "-servers", strings.Join(o.servers.WS, ","))
	if err != nil {
		o.fail("setup: clients process", err)
		return 1
	}
	defer func() { _ = clients.Stop() }()

	ctx, cancel := context.WithTimeout(context.Background(), cfg.budget)
	defer cancel()
	o.budget = ctx
	o.timed("notify baseline", func() { o.phaseBaseline(ctx) })
	o.timed("open fan-out connections", func() { err = o.openFanout(ctx) })
	if err != nil {
		o.fail(fmt.Sprintf("setup: open %d connections", cfg.fanout), err)
		code = 1
	} else {
		o.timed("fetches per change", func() { o.phaseFetches(ctx) })
		o.timed("rate (deliveries, CPU, latency)", func() { o.phaseRate(ctx, false) })
		if o.cfg.rateAsync {
			o.timed("rate again with NotifyAsync", func() { o.phaseRate(ctx, true) })
		}
		if o.cfg.lowRate > 0 {
			o.timed("latency at a low rate", func() { o.phaseLowRate(ctx) })
		}
		o.timed("burst", func() { o.phaseBurst(ctx) })
	}
	o.timed("idle memory", func() { o.phaseMemory(ctx) })
	// A last look at the clients even when the budget ran out.
	hctx, hcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer hcancel()
	o.clientHealth(hctx)
	for _, r := range o.rows {
		if strings.HasPrefix(r.value, "ERROR") {
			code = 1 // a phase failed (a missed target is not an error)
		}
	}
	return code
}

func (o *orchestrator) timed(name string, f func()) {
	start := time.Now()
	progress("phase %q", name)
	f()
	o.timings = append(o.timings, fmt.Sprintf("%s %.1fs", name, time.Since(start).Seconds()))
}

func (o *orchestrator) add(metric, value, target string) {
	o.rows = append(o.rows, row{metric, value, target})
}

func (o *orchestrator) fail(metric string, err error) {
	if o.budget != nil && o.budget.Err() != nil {
		err = fmt.Errorf("%w (the -budget of %s ran out)", err, o.cfg.budget)
	}
	progress("%s: %v", metric, err)
	o.add(metric, "ERROR: "+oneLine(err.Error()), "")
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	s = strings.ReplaceAll(s, "|", "/")
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

// hostSample is what the machine as a whole was doing.
type hostSample struct {
	loadavg     string
	busy, total float64 // CPU seconds since boot, all cores (/proc/stat)
	own         float64 // CPU seconds of this process and its waited-for children
}

func readHost() hostSample {
	var h hostSample
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) >= 3 {
			h.loadavg = strings.Join(f[:3], " ")
		}
	}
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := strings.Cut(string(b), "\n")
		f := strings.Fields(line)
		for i, v := range f[1:] {
			n, _ := strconv.ParseFloat(v, 64)
			n /= 100 // USER_HZ
			h.total += n
			if i != 3 && i != 4 { // idle, iowait
				h.busy += n
			}
		}
	}
	for _, who := range []int{syscall.RUSAGE_SELF, syscall.RUSAGE_CHILDREN} {
		var ru syscall.Rusage
		if syscall.Getrusage(who, &ru) == nil {
			h.own += float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
		}
	}
	return h
}

// print writes the table to stdout.
func (o *orchestrator) print(total time.Duration, host hostSample) {
	end := readHost()
	var b strings.Builder
	b.WriteString("\n| metric | value | target |\n| --- | --- | --- |\n")
	for _, r := range o.rows {
		fmt.Fprintf(&b, "| %s | %s | %s |\n", r.metric, r.value, r.target)
	}
	fmt.Fprintf(&b, "\ncommand: `%s` (`make bench`); %s %s/%s, GOMAXPROCS=%d, NumCPU=%d, RLIMIT_NOFILE=%d; "+
		"nsqd v1.3.0 embedded in the orchestrator, %d servers in one process, clients in another, all on 127.0.0.1; total %.1fs\n",
		strings.Join(append([]string{"go run ./bench"}, os.Args[1:]...), " "), runtime.Version(), runtime.GOOS, runtime.GOARCH, runtime.GOMAXPROCS(0), runtime.NumCPU(),
		nofile(), serverCount, total.Seconds())
	if o.servers.Web != "" {
		fmt.Fprintf(&b, "servers: entitysync.New with %s; entity fetch returns one ~70-byte JSON row\n", o.servers.Web)
	}
	if len(o.timings) > 0 {
		fmt.Fprintf(&b, "phases: %s\n", strings.Join(o.timings, ", "))
	}
	if span := end.total - host.total; span > 0 {
		busy, own := end.busy-host.busy, end.own-host.own
		fmt.Fprintf(&b, "host during the run: load average %s at start, %s at end; CPU busy %.0f%% of the %d cores' capacity, this benchmark's processes %.0f%% "+
			"(the rest is other processes and kernel work such as loopback softirq; other load makes every number here worse)\n",
			host.loadavg, end.loadavg, 100*busy/span, runtime.NumCPU(), 100*own/span)
	}
	for _, n := range o.notes {
		fmt.Fprintf(&b, "note: %s\n", n)
	}
	fmt.Print(b.String())
}

// --- control calls ---

// call POSTs to base+path with query and decodes the JSON answer into out,
// giving up after timeout (or when ctx ends).
func (o *orchestrator) call(ctx context.Context, timeout time.Duration, base, path string, query url.Values, out any) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if query == nil {
		query = url.Values{}
	}
	query.Set("timeout_ms", fmt.Sprint((timeout - time.Second).Milliseconds()))
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+path+"?"+query.Encode(), nil)
	if err != nil {
		return err
	}
	resp, err := o.http.Do(req)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s: %s", path, resp.Status, strings.TrimSpace(string(body)))
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func q(kv ...any) url.Values {
	v := url.Values{}
	for i := 0; i+1 < len(kv); i += 2 {
		v.Set(fmt.Sprint(kv[i]), fmt.Sprint(kv[i+1]))
	}
	return v
}

// serverStats returns every server's stats; with gc, the process collects
// garbage first (once: both servers share the process).
func (o *orchestrator) stats(ctx context.Context, gc bool) ([]serverStats, error) {
	out := make([]serverStats, len(o.servers.Ctl))
	for i, base := range o.servers.Ctl {
		query := url.Values{}
		if gc && i == 0 {
			query.Set("gc", "1")
		}
		if err := o.call(ctx, 15*time.Second, base, "/ctl/stats", query, &out[i]); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func sumFetches(st []serverStats) (total uint64, per []uint64) {
	for _, s := range st {
		total += s.Bridge.Fetches
		per = append(per, s.Bridge.Fetches)
	}
	return total, per
}

// bump changes id n times through server 0: rate per second, or with rate
// 0 as fast as conc concurrent writers go; with async, each notify is a
// NotifyAsync and the call returns once they are all published.
func (o *orchestrator) bump(ctx context.Context, id string, n int, rate float64, conc int, async bool, timeout time.Duration) (bumpResult, error) {
	var res bumpResult
	query := q("id", id, "n", n, "rate", rate, "conc", conc)
	if async {
		query.Set("async", "1")
	}
	err := o.call(ctx, timeout, o.servers.Ctl[0], "/ctl/bump", query, &res)
	switch {
	case err != nil:
	case res.Errors > 0:
		err = fmt.Errorf("%d of %d notifies failed: %s", res.Errors, n, res.FirstError)
	case res.FlushErr != "":
		err = fmt.Errorf("flushing NotifyAsync's queue: %s (%d published, %d pending, %d publish errors)",
			res.FlushErr, res.Published, res.Pending, res.NotifyErrors)
	}
	return res, err
}

// wait waits until clients [0, to) hold version v of id.
func (o *orchestrator) wait(ctx context.Context, id string, v int64, to int, timeout time.Duration) (waitResult, error) {
	var res waitResult
	err := o.call(ctx, timeout, o.clients.Ctl, "/wait", q("id", id, "v", v, "from", 0, "to", to), &res)
	if err == nil && !res.OK {
		err = fmt.Errorf("%d of %d clients still below version %d of %s after %.0f ms (lowest %d)", res.Behind, to, v, id, res.Ms, res.MinV)
	}
	return res, err
}

func (o *orchestrator) subscribe(ctx context.Context, id string, to int, each bool, timeout time.Duration) (subscribeResult, error) {
	var res subscribeResult
	query := q("id", id, "from", 0, "to", to)
	if each {
		query.Set("each", "1")
	}
	err := o.call(ctx, timeout, o.clients.Ctl, "/subscribe", query, &res)
	if err == nil && (res.Missing > 0 || res.Errors > 0) {
		err = fmt.Errorf("%d of %d clients without the initial state of %s after %.0f ms (%d send errors %s)",
			res.Missing, res.N, id, res.Ms, res.Errors, res.FirstErr)
	}
	return res, err
}

func (o *orchestrator) open(ctx context.Context, n int, timeout time.Duration) (openResult, error) {
	var res openResult
	err := o.call(ctx, timeout, o.clients.Ctl, "/open", q("n", n), &res)
	if err == nil && res.Errors > 0 {
		err = fmt.Errorf("%d of %d connections failed: %s", res.Errors, n, res.FirstErr)
	}
	return res, err
}

func (o *orchestrator) record(ctx context.Context, on bool) (recordResult, error) {
	var res recordResult
	v := "0"
	if on {
		v = "1"
	}
	err := o.call(ctx, 30*time.Second, o.clients.Ctl, "/record", q("on", v), &res)
	return res, err
}

// --- phases ---

func (o *orchestrator) openFanout(ctx context.Context) error {
	res, err := o.open(ctx, o.cfg.fanout, 60*time.Second)
	if err == nil {
		progress("opened %d connections in %.0f ms", res.Opened, res.Ms)
	}
	return err
}

// phaseFetches: for 1, 100 and fanout subscribers of a fresh key, K spaced
// changes, each waiting for delivery to every subscriber before the next.
func (o *orchestrator) phaseFetches(ctx context.Context) {
	sizes := []int{1, 100, o.cfg.fanout}
	sizes = slices.Compact(sizes)
	for _, n := range sizes {
		metric := fmt.Sprintf("fetches per change, %d subscriber(s) of one key", n)
		if err := o.fetchesFor(ctx, n, metric); err != nil {
			o.fail(metric, err)
		}
	}
}

func (o *orchestrator) fetchesFor(ctx context.Context, n int, metric string) error {
	id := fmt.Sprintf("f%d", n)
	if _, err := o.subscribe(ctx, id, n, false, 30*time.Second); err != nil {
		return err
	}
	before, err := o.stats(ctx, false)
	if err != nil {
		return err
	}
	k := o.cfg.changes
	start := time.Now()
	for i := 1; i <= k; i++ {
		res, err := o.bump(ctx, id, 1, 0, 1, false, 10*time.Second)
		if err != nil {
			return err
		}
		if _, err := o.wait(ctx, id, res.LastVersion, n, 10*time.Second); err != nil {
			return fmt.Errorf("change %d: %w", i, err)
		}
	}
	elapsed := time.Since(start)
	time.Sleep(50 * time.Millisecond) // count a trailing round, if any
	after, err := o.stats(ctx, false)
	if err != nil {
		return err
	}
	tb, pb := sumFetches(before)
	ta, pa := sumFetches(after)
	withSubs := min(n, len(o.servers.Ctl)) // connection i is on server i % servers
	per := make([]string, len(pa))
	for i := range pa {
		per[i] = fmt.Sprint(pa[i] - pb[i])
	}
	o.add(metric, fmt.Sprintf("%.2f (%d fetches / %d changes / %d server(s) with subscribers; per server %s; %.1f ms per change incl. delivery)",
		float64(ta-tb)/float64(k)/float64(withSubs), ta-tb, k, withSubs, strings.Join(per, "/"),
		float64(elapsed.Microseconds())/1000/float64(k)), "1")
	return nil
}

// burstWriters is how many goroutines change and notify concurrently in
// the burst phases: enough to keep nsqd busy while each publish waits for
// its acknowledgement.
const burstWriters = 64

// phaseBaseline: notifies for a key nobody subscribes to, before any client
// connects: what publishing through nsqd costs alone, and that such a
// change costs no fetch.
func (o *orchestrator) phaseBaseline(ctx context.Context) {
	const k = 2000
	metric := fmt.Sprintf("baseline: %d notifies of a key with no subscriber, no clients connected (%d writers)", k, burstWriters)
	before, err := o.stats(ctx, false)
	if err != nil {
		o.fail(metric, err)
		return
	}
	br, err := o.bump(ctx, "nobody", k, 0, burstWriters, false, 30*time.Second)
	if err != nil {
		o.fail(metric, err)
		return
	}
	after, err := o.waitReceived(ctx, before, k)
	if err != nil {
		o.fail(metric, err)
		return
	}
	tb, _ := sumFetches(before)
	ta, _ := sumFetches(after)
	var recv []string
	for i := range after {
		recv = append(recv, fmt.Sprint(after[i].Bridge.Received-before[i].Bridge.Received))
	}
	o.add(metric, fmt.Sprintf("%.0f notifies/s; notify call p50 %s, p99 %s; received per server %s; fetches %d",
		float64(k)/(float64(br.Done-br.FirstNotify)/1e9), ms(br.NotifyP50), ms(br.NotifyP99), strings.Join(recv, "/"), ta-tb), "0 fetches")
}

// waitReceived waits (up to 10s) until every server received k more
// notifications than in before, and returns the servers' stats then.
func (o *orchestrator) waitReceived(ctx context.Context, before []serverStats, k int) ([]serverStats, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		after, err := o.stats(ctx, false)
		if err != nil {
			return nil, err
		}
		all := true
		for i := range after {
			all = all && after[i].Bridge.Received-before[i].Bridge.Received >= uint64(k)
		}
		if all || time.Now().After(deadline) {
			return after, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// phaseLowRate: the latency again at a change rate the machine sustains,
// to tell the library's latency from queueing on a saturated machine.
func (o *orchestrator) phaseLowRate(ctx context.Context) {
	n, rate := o.cfg.fanout, o.cfg.lowRate
	const d = 3 * time.Second
	changes := int(float64(rate) * d.Seconds())
	metric := fmt.Sprintf("notify -> client latency p50 / p99 (max), %d changes/s for %s, %d clients", rate, d, n)
	if _, err := o.record(ctx, true); err != nil {
		o.fail(metric, err)
		return
	}
	br, err := o.bump(ctx, "hot", changes, float64(rate), 1, false, d+30*time.Second)
	if err != nil {
		o.fail(metric, err)
		return
	}
	wr, err := o.wait(ctx, "hot", br.LastVersion, n, 30*time.Second)
	if err != nil {
		o.fail(metric, err)
		return
	}
	rec, err := o.record(ctx, false)
	if err != nil {
		o.fail(metric, err)
		return
	}
	window := time.Duration(wr.Converged - br.FirstNotify)
	o.add(metric, fmt.Sprintf("%s / %s (%s) over %d frames (%.1f%% of %d changes x %d clients, %.0f deliveries/s); notify call p50 %s, p99 %s",
		ms(rec.P50), ms(rec.P99), ms(rec.Max), rec.Samples, 100*float64(rec.Frames)/float64(changes*n), changes, n,
		float64(rec.Frames)/window.Seconds(), ms(br.NotifyP50), ms(br.NotifyP99)), "p99 <= 10 ms")
}

// phaseRate: fanout clients on one key, rate changes/s for rateFor;
// deliveries counted by the clients, CPU by the servers process. With
// async, the changes are notified with NotifyAsync instead of
// NotifyAllOfChange, and the rows say so.
func (o *orchestrator) phaseRate(ctx context.Context, async bool) {
	n, rate := o.cfg.fanout, o.cfg.rate
	changes := int(float64(rate) * o.cfg.rateFor.Seconds())
	how, call, profile := "", "NotifyAllOfChange", "rate"
	if async {
		how, call, profile = ", notified with NotifyAsync", "NotifyAsync", "rate-async"
	}
	mDel := fmt.Sprintf("deliveries/s, %d clients on one key, %d changes/s for %s%s", n, rate, o.cfg.rateFor, how)
	mCPU := "server CPU per delivery (servers process user+sys / deliveries)" + how
	mLat := fmt.Sprintf("notify -> client latency p50 / p99 (max), %d changes/s, %d clients%s", rate, n, how)
	failAll := func(err error) {
		o.fail(mDel, err)
		o.add(mCPU, "not measured (see above)", "")
		o.add(mLat, "not measured (see above)", "p99 <= 10 ms")
	}
	if !async { // the async run follows the sync one, on the same subscriptions
		if _, err := o.subscribe(ctx, "hot", n, false, 30*time.Second); err != nil {
			failAll(err)
			return
		}
	}
	if _, err := o.record(ctx, true); err != nil {
		failAll(err)
		return
	}
	before, err := o.stats(ctx, false)
	if err != nil {
		failAll(err)
		return
	}
	cBefore, err := o.clientStats(ctx)
	if err != nil {
		failAll(err)
		return
	}
	profiles := o.profileCPU(ctx, profile, o.cfg.rateFor)
	br, err := o.bump(ctx, "hot", changes, float64(rate), 1, async, o.cfg.rateFor+30*time.Second)
	if err != nil {
		failAll(err)
		return
	}
	wr, err := o.wait(ctx, "hot", br.LastVersion, n, 30*time.Second)
	if err != nil {
		if async {
			// Every call returned nil and the queue was flushed, so a
			// change that never arrives was lost inside NotifyAsync.
			err = fmt.Errorf("%w; NotifyAsync: published %d of %d calls (%d merged into a key still waiting), pending %d, publish errors %d",
				err, br.Published, br.N, uint64(br.N)-br.Published, br.Pending, br.NotifyErrors)
		}
		failAll(err)
		return
	}
	after, err := o.stats(ctx, false)
	if err != nil {
		failAll(err)
		return
	}
	cAfter, err := o.clientStats(ctx)
	if err != nil {
		failAll(err)
		return
	}
	rec, err := o.record(ctx, false)
	if err != nil {
		failAll(err)
		return
	}
	profiles()
	window := time.Duration(wr.Converged - br.FirstNotify)
	cpu := time.Duration(after[0].Proc.CPUNanos - before[0].Proc.CPUNanos)
	ccpu := time.Duration(cAfter.Proc.CPUNanos - cBefore.Proc.CPUNanos)
	var served uint64
	for i := range after {
		served += after[i].Bridge.Deliveries - before[i].Bridge.Deliveries
	}
	full := uint64(changes) * uint64(n)
	o.add(mDel, fmt.Sprintf("%.0f/s (%d frames received in %.2f s, first change to last client converged; %.1f%% of %d changes x %d clients, the rest coalesced by latest-wins; bridge handed %d updates to outboxes)",
		float64(rec.Frames)/window.Seconds(), rec.Frames, window.Seconds(), 100*float64(rec.Frames)/float64(full), changes, n, served), "")
	if rec.Frames > 0 {
		o.add(mCPU, fmt.Sprintf("%.2f us (servers %.2f CPU-s = %.0f%% of one core over the %.2f s; clients process %.2f CPU-s = %.1f us per frame read)",
			float64(cpu.Nanoseconds())/1000/float64(rec.Frames), cpu.Seconds(), 100*cpu.Seconds()/window.Seconds(), window.Seconds(),
			ccpu.Seconds(), float64(ccpu.Nanoseconds())/1000/float64(rec.Frames)), "")
	} else {
		o.add(mCPU, "ERROR: no frames received", "")
	}
	lat := fmt.Sprintf("%s / %s (%s) over %d frames; the %s calls themselves took p50 %s, p99 %s, max %s",
		ms(rec.P50), ms(rec.P99), ms(rec.Max), rec.Samples, call, ms(br.NotifyP50), ms(br.NotifyP99), ms(br.NotifyMax))
	if async {
		// Every call returned nil (bump counts errors); a key already
		// waiting to be published is not queued twice, so published +
		// merged = calls.
		lat += fmt.Sprintf("; published %d of %d calls (%d merged into a key still waiting), pending after FlushNotifications %d, publish errors %d, flushed %s after the last call returned",
			br.Published, br.N, uint64(br.N)-br.Published, br.Pending, br.NotifyErrors, ms(br.Flushed-br.Done))
	}
	o.add(mLat, lat, "p99 <= 10 ms")
}

func ms(ns int64) string { return fmt.Sprintf("%.2f ms", float64(ns)/1e6) }

// phaseBurst: burst changes to the hot key as fast as one publisher goes;
// time from the last notify until every client holds the final version.
func (o *orchestrator) phaseBurst(ctx context.Context) {
	n, k := o.cfg.fanout, o.cfg.burst
	mTime := fmt.Sprintf("burst of %d changes to one key (%d clients): last notify -> every client has the final state", k, n)
	mFetch := fmt.Sprintf("fetches for the %d-change burst (all servers)", k)
	before, err := o.stats(ctx, false)
	if err != nil {
		o.fail(mTime, err)
		return
	}
	if _, err := o.record(ctx, true); err != nil {
		o.fail(mTime, err)
		return
	}
	writers := burstWriters
	br, err := o.bump(ctx, "hot", k, 0, writers, false, 60*time.Second)
	if err != nil {
		o.fail(mTime, err)
		o.add(mFetch, "not measured (see above)", "")
		return
	}
	wr, err := o.wait(ctx, "hot", br.LastVersion, n, 30*time.Second)
	if err != nil {
		o.fail(mTime, err)
		o.add(mFetch, "not measured (see above)", "")
		return
	}
	rec, _ := o.record(ctx, false)
	// Count the rounds that notifications still queued at convergence
	// cause (they find the rows unchanged and send nothing).
	if _, err := o.waitReceived(ctx, before, k); err != nil {
		o.fail(mFetch, err)
		return
	}
	time.Sleep(50 * time.Millisecond)
	after, err := o.stats(ctx, false)
	if err != nil {
		o.fail(mFetch, err)
		return
	}
	tb, pb := sumFetches(before)
	ta, pa := sumFetches(after)
	var recv []string
	per := make([]string, len(pa))
	for i := range pa {
		per[i] = fmt.Sprint(pa[i] - pb[i])
		recv = append(recv, fmt.Sprint(after[i].Bridge.Received-before[i].Bridge.Received))
	}
	o.add(mTime, fmt.Sprintf("%s (%d writers notified for %.2f s, %.0f notifies/s, notify call p50 %s p99 %s; clients received %d frames)",
		ms(wr.Converged-br.LastNotify), writers, float64(br.Done-br.FirstNotify)/1e9,
		float64(k)/(float64(br.Done-br.FirstNotify)/1e9), ms(br.NotifyP50), ms(br.NotifyP99), rec.Frames), "")
	o.add(mFetch, fmt.Sprintf("%d = %.3f per change per server (per server %s; notifications received per server %s)",
		ta-tb, float64(ta-tb)/float64(k)/float64(len(pa)), strings.Join(per, "/"), strings.Join(recv, "/")), "")
}

// phaseMemory: close everything, then open idle connections subscribed to
// nothing, then subscribe each to its own key; memory per connection in the
// servers process at each step.
func (o *orchestrator) phaseMemory(ctx context.Context) {
	n := o.cfg.idle
	mNone := fmt.Sprintf("memory per idle connection, %d connections subscribed to nothing (servers HeapInuse+StackInuse)", n)
	mOne := fmt.Sprintf("memory per idle connection, %d connections each subscribed to its own key", n)
	var cr map[string]any
	if err := o.call(ctx, 30*time.Second, o.clients.Ctl, "/closeall", nil, &cr); err != nil {
		o.fail(mNone, err)
		return
	}
	if err := o.settle(ctx, 0); err != nil {
		o.fail(mNone, fmt.Errorf("after closing the fan-out clients: %w", err))
		return
	}
	before, err := o.stats(ctx, true)
	if err != nil {
		o.fail(mNone, err)
		return
	}
	res, err := o.open(ctx, n, 90*time.Second)
	if err != nil {
		o.fail(mNone, err)
		return
	}
	progress("opened %d idle connections in %.0f ms", res.Opened, res.Ms)
	if err := o.settle(ctx, n); err != nil {
		o.fail(mNone, err)
		return
	}
	idle, err := o.stats(ctx, true)
	if err != nil {
		o.fail(mNone, err)
		return
	}
	o.profileHeap(ctx, "idle-none")
	perConn := func(a, b procStats) string {
		d := a.mem() - b.mem()
		return fmt.Sprintf("%.2f KiB (heap %.2f + stack %.2f; %.2f goroutines/conn)",
			float64(d)/1024/float64(n),
			float64(int64(a.HeapInuse)-int64(b.HeapInuse))/1024/float64(n),
			float64(int64(a.StackInuse)-int64(b.StackInuse))/1024/float64(n),
			float64(a.Goroutines-b.Goroutines)/float64(n))
	}
	o.add(mNone, perConn(idle[0].Proc, before[0].Proc)+fmt.Sprintf("; opened in %.1f s", res.Ms/1000), "<= 8 KiB")

	sr, err := o.subscribe(ctx, "idle", n, true, 60*time.Second)
	if err != nil {
		o.fail(mOne, err)
	} else {
		subbed, err := o.stats(ctx, true)
		if err != nil {
			o.fail(mOne, err)
		} else {
			o.profileHeap(ctx, "idle-onekey")
			o.add(mOne, perConn(subbed[0].Proc, before[0].Proc)+fmt.Sprintf("; %d subscriptions with initial state in %.1f s", n, sr.Ms/1000), "<= 8 KiB")
		}
	}
	if err := o.call(ctx, 60*time.Second, o.clients.Ctl, "/closeall", nil, &cr); err != nil {
		o.notes = append(o.notes, "closing idle connections: "+err.Error())
	}
}

// settle waits until the servers count want connected clients in total.
func (o *orchestrator) settle(ctx context.Context, want int) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := o.stats(ctx, false)
		if err != nil {
			return err
		}
		clients := 0
		for _, s := range st {
			clients += int(s.Bridge.Clients)
		}
		if clients == want {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("servers count %d clients, want %d", clients, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (o *orchestrator) clientStats(ctx context.Context) (clientStats, error) {
	var cs clientStats
	err := o.call(ctx, 10*time.Second, o.clients.Ctl, "/stats", nil, &cs)
	return cs, err
}

// profileCPU starts CPU profiles of the servers and clients processes for d
// when -profile is set; the returned function waits for them.
func (o *orchestrator) profileCPU(ctx context.Context, name string, d time.Duration) (wait func()) {
	if o.cfg.profile == "" {
		return func() {}
	}
	done := make(chan struct{}, 2)
	for role, base := range map[string]string{"servers": o.servers.Ctl[0], "clients": o.clients.Ctl} {
		go func() {
			defer func() { done <- struct{}{} }()
			o.fetchProfile(ctx, base+"/debug/pprof/profile?seconds="+fmt.Sprint(int(d.Seconds())), d+30*time.Second,
				fmt.Sprintf("%s-%s.cpu.pprof", name, role))
		}()
	}
	return func() { <-done; <-done }
}

// profileHeap saves the servers process's heap profile when -profile is set.
func (o *orchestrator) profileHeap(ctx context.Context, name string) {
	if o.cfg.profile != "" {
		o.fetchProfile(ctx, o.servers.Ctl[0]+"/debug/pprof/heap", 30*time.Second, name+"-servers.heap.pprof")
	}
}

func (o *orchestrator) fetchProfile(ctx context.Context, u string, timeout time.Duration, file string) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	err := func() error {
		if err := os.MkdirAll(o.cfg.profile, 0o755); err != nil {
			return err
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return err
		}
		resp, err := o.http.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return errors.New(resp.Status)
		}
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(o.cfg.profile, file), b, 0o644)
	}()
	if err != nil {
		o.notes = append(o.notes, fmt.Sprintf("profile %s: %v", file, err))
	} else {
		progress("wrote %s", filepath.Join(o.cfg.profile, file))
	}
}

// clientHealth adds a row with what the clients saw go wrong, if anything.
func (o *orchestrator) clientHealth(ctx context.Context) {
	var cs clientStats
	if err := o.call(ctx, 10*time.Second, o.clients.Ctl, "/stats", nil, &cs); err != nil {
		o.notes = append(o.notes, "clients stats: "+err.Error())
		return
	}
	v := fmt.Sprintf("%d (read errors %d, unexpected frames %d); clients process CPU %.1f s",
		cs.Backwards, cs.ReadErrors, cs.BadFrames, float64(cs.Proc.CPUNanos)/1e9)
	if cs.FirstErr != "" {
		v += "; first error: " + oneLine(cs.FirstErr)
	}
	o.add("per-key order violations seen by clients (whole run)", v, "0")
}
