//go:build linux

package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/entity-sync/entity-sync/internal/nsqtest"
)

// defaultRows are the rows: 20 clients at 100 changes/s, 200 and
// 1,000 clients at 200 changes/s, one key. The 100/s row makes 500
// changes instead of 1,000 (5 s instead of 10) to keep the peer phase
// near two minutes; the others make 1,000.
const defaultRows = "20:100:500,200:200:1000,1000:200:1000"

// rowSpec is one row: how many clients, how fast and how many changes.
type rowSpec struct {
	clients int
	rate    float64
	changes int
}

func (r rowSpec) String() string {
	return fmt.Sprintf("%s clients, %g/s × %s", commas(int64(r.clients)), r.rate, commas(int64(r.changes)))
}

func parseRows(s string) ([]rowSpec, error) {
	var rows []rowSpec
	for f := range strings.SplitSeq(s, ",") {
		p := strings.Split(strings.TrimSpace(f), ":")
		if len(p) != 3 {
			return nil, fmt.Errorf("row %q: want clients:rate:changes", f)
		}
		c, err1 := strconv.Atoi(p[0])
		r, err2 := strconv.ParseFloat(p[1], 64)
		n, err3 := strconv.Atoi(p[2])
		if err := errors.Join(err1, err2, err3); err != nil || c <= 0 || c > maxClients || r <= 0 || r > 10000 || n <= 0 || n > 100000 {
			return nil, fmt.Errorf("row %q: want 0 < clients <= 20000, 0 < rate <= 10000, 0 < changes <= 100000", f)
		}
		rows = append(rows, rowSpec{c, r, n})
	}
	return rows, nil
}

// system is one of the two systems under test.
type system struct {
	role string // the child role, also the client protocol's name
	name string // as the tables print it
}

var systems = []system{{"es", "entity-sync"}, {"cf", "Centrifuge v0.40.1"}}

// result is one system's measurement of one row.
type result struct {
	servers int
	sys     system
	row     rowSpec
	err     string // why the row has no (or a partial) measurement

	cpuNs   int64 // CPU of the process holding the clients' server
	clients rowResult
	pub     publishResult
}

// floorResult is the floor's measurement of one row.
type floorResult struct {
	row    rowSpec
	err    string
	cpuNs  int64
	frames int64 // bytes received by the clients / frame size
	run    floorRun
}

type orchestrator struct {
	cfg     config
	clients *child
	cell    string
	nsqd    string
	prefix  string // Centrifuge's Redis prefix for this run
	results []result
	floor   []floorResult
	notes   []string
}

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "peer: %s "+format+"\n", append([]any{time.Now().Format("15:04:05.000")}, args...)...)
}

func runOrchestrator(cfg config) int {
	start, host := time.Now(), readHost()
	rows, err := parseRows(cfg.rows)
	if err != nil {
		fmt.Fprintln(os.Stderr, "peer:", err)
		return 2
	}
	o := &orchestrator{cfg: cfg, prefix: fmt.Sprintf("entity-sync-bench-%d", os.Getpid())}
	defer func() { o.print(rows, time.Since(start), host) }()
	ctx, cancel := context.WithTimeout(context.Background(), cfg.budget)
	defer cancel()

	dir, err := os.MkdirTemp("", "entity-sync-peer-")
	if err != nil {
		o.note("setup: %v", err)
		return 1
	}
	defer os.RemoveAll(dir)
	o.cell = filepath.Join(dir, "version")
	if err := createCell(o.cell); err != nil {
		o.note("setup: %v", err)
		return 1
	}
	broker, err := nsqtest.Embed()
	if err != nil {
		o.note("setup: embedded nsqd: %v", err)
		return 1
	}
	defer broker.Close()
	o.nsqd = broker.TCPAddr()
	if o.clients, err = spawn("clients", 30*time.Second); err != nil {
		o.note("setup: %v", err)
		return 1
	}
	defer o.clients.stop()

	// Traffic stays on this machine: a Redis elsewhere is refused, as
	// if none answered.
	redisErr := loopbackOnly(cfg.redis)
	if redisErr == nil {
		redisErr = pingRedis(cfg.redis)
	}
	for servers := 1; servers <= 2; servers++ {
		if servers == 2 && cfg.skipTwo {
			o.note("two-server half skipped (-one-server-only)")
			break
		}
		for _, sys := range systems {
			if servers == 2 && sys.role == "cf" && redisErr != nil {
				o.note("no Redis answers at %s (%v): Centrifuge's two-server half skipped", cfg.redis, redisErr)
				continue
			}
			o.runSystem(ctx, sys, servers, rows)
		}
	}
	o.runFloor(ctx, rows)

	code := 0
	for _, r := range o.results {
		if r.err != "" {
			code = 1
		}
	}
	for _, f := range o.floor {
		if f.err != "" {
			code = 1
		}
	}
	return code
}

func (o *orchestrator) note(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	progress("%s", s)
	o.notes = append(o.notes, s)
}

// loopbackOnly refuses an address that is not a loopback IP.
func loopbackOnly(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("%s is not a loopback IP address; the benchmark talks to this machine only", host)
	}
	return nil
}

// pingRedis checks that a Redis server answers PING at addr.
func pingRedis(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("PING answered %q", strings.TrimSpace(line))
	}
	return nil
}

// runSystem starts sys's server process(es) and measures every row. With
// one server, it holds the clients and is also the publisher (entity-sync's
// in-process queue, Centrifuge's memory broker). With two, the clients are
// all on the first and the changes are published through the second, so
// each change crosses the broker (nsqd, Redis) between two processes.
func (o *orchestrator) runSystem(ctx context.Context, sys system, servers int, rows []rowSpec) {
	args := []string{"-cell", o.cell}
	if servers == 2 {
		switch sys.role {
		case "es":
			args = append(args, "-nsqd", o.nsqd)
		case "cf":
			args = append(args, "-redis-addr", o.cfg.redis, "-prefix", o.prefix)
		}
	}
	if o.cfg.verbose {
		args = append(args, "-v")
	}
	failAll := func(err error) {
		for _, row := range rows {
			o.results = append(o.results, result{servers: servers, sys: sys, row: row, err: "setup: " + err.Error()})
		}
		progress("%s, %d server(s): %v", sys.name, servers, err)
	}
	holder, err := spawn(sys.role, 30*time.Second, args...)
	if err != nil {
		failAll(err)
		return
	}
	defer holder.stop()
	publisher := holder
	if servers == 2 {
		if publisher, err = spawn(sys.role, 30*time.Second, args...); err != nil {
			failAll(err)
			return
		}
		defer publisher.stop()
	}
	for _, row := range rows {
		progress("%s, %d server(s), %s", sys.name, servers, row)
		r := o.runRow(ctx, sys, holder, publisher, row)
		r.servers = servers
		if r.err != "" {
			progress("  %s", r.err)
		}
		o.results = append(o.results, r)
	}
}

// runRow measures one row: open the clients on holder and wait until each
// is subscribed; one warm-up change through the whole path (not measured);
// then record, make the row's changes through publisher at its rate, wait
// until every client holds the last one, and collect the clients' frames
// and visible latencies and holder's CPU time over that window.
func (o *orchestrator) runRow(ctx context.Context, sys system, holder, publisher *child, row rowSpec) result {
	res := result{sys: sys, row: row}
	cl := o.clients.hello.Ctl
	var open openResult
	err := call(ctx, 90*time.Second, cl, "/open", url.Values{"proto": {sys.role}, "url": {holder.hello.WS}, "n": {fmt.Sprint(row.clients)}}, nil, &open)
	defer func() {
		if err := call(context.Background(), 30*time.Second, cl, "/close", nil, nil, nil); err != nil {
			o.note("closing %s clients: %v", sys.name, err)
		}
	}()
	if err == nil && open.Errors > 0 {
		err = fmt.Errorf("%d of %d connections failed: %s", open.Errors, row.clients, open.FirstErr)
	}
	if err != nil {
		res.err = "open: " + err.Error()
		return res
	}

	// The warm-up also proves the path: a subscription the broker has not
	// set up yet (Centrifuge subscribes to Redis on the first client) loses
	// a change, so it is retried a few times before the row fails.
	var wr waitResult
	for try := 1; ; try++ {
		var warm publishResult
		err = call(ctx, 10*time.Second, publisher.hello.Ctl, "/publish", url.Values{"n": {"1"}, "rate": {"1"}}, nil, &warm)
		if err == nil {
			err = call(ctx, 5*time.Second, cl, "/wait", url.Values{"v": {fmt.Sprint(warm.FirstV)}}, nil, &wr)
		}
		if err == nil && !wr.OK {
			err = fmt.Errorf("%d clients behind, %d dead", wr.Behind, wr.Dead)
		}
		if err == nil || try == 5 || ctx.Err() != nil {
			break
		}
	}
	if err != nil {
		res.err = "warm-up change: " + err.Error()
		return res
	}

	var before, after serverStats
	if err := call(ctx, 10*time.Second, cl, "/record", nil, nil, nil); err != nil {
		res.err = "record: " + err.Error()
		return res
	}
	if err := call(ctx, 10*time.Second, holder.hello.Ctl, "/stats", nil, nil, &before); err != nil {
		res.err = "stats: " + err.Error()
		return res
	}
	span := time.Duration(float64(row.changes) / row.rate * float64(time.Second))
	err = call(ctx, span+60*time.Second, publisher.hello.Ctl, "/publish",
		url.Values{"n": {fmt.Sprint(row.changes)}, "rate": {fmt.Sprint(row.rate)}}, nil, &res.pub)
	if err == nil && res.pub.Errors > 0 {
		err = fmt.Errorf("%d notify errors: %s", res.pub.Errors, res.pub.FirstErr)
	}
	if err != nil || len(res.pub.NotifyNs) == 0 {
		res.err = fmt.Sprintf("publish: %v", err)
		return res
	}
	lastV := res.pub.FirstV + int64(len(res.pub.NotifyNs)) - 1
	waitErr := call(ctx, 62*time.Second, cl, "/wait", url.Values{"v": {fmt.Sprint(lastV)}}, nil, &wr)
	if err := call(ctx, 10*time.Second, holder.hello.Ctl, "/stats", nil, nil, &after); err != nil {
		res.err = "stats: " + err.Error()
		return res
	}
	res.cpuNs = after.CPUNanos - before.CPUNanos
	req := resultRequest{FirstV: res.pub.FirstV, NotifyNs: res.pub.NotifyNs}
	if err := call(ctx, 60*time.Second, cl, "/result", nil, req, &res.clients); err != nil {
		res.err = "result: " + err.Error()
		return res
	}
	switch {
	case waitErr != nil:
		res.err = "waiting for the last change: " + waitErr.Error()
	case !wr.OK:
		res.err = fmt.Sprintf("not converged after %.0f s: %d clients behind (lowest at v%d of v%d), %d dead",
			wr.Ms/1000, wr.Behind, wr.MinV, lastV, wr.Dead)
	}
	return res
}

// runFloor measures the floor for every row: the same connection count
// and changes, in a floor server process of its own.
func (o *orchestrator) runFloor(ctx context.Context, rows []rowSpec) {
	fs, err := spawn("floor", 30*time.Second)
	if err != nil {
		for _, row := range rows {
			o.floor = append(o.floor, floorResult{row: row, err: err.Error()})
		}
		return
	}
	defer fs.stop()
	for _, row := range rows {
		progress("floor, %s", row)
		r := o.runFloorRow(ctx, fs, row)
		if r.err != "" {
			progress("  %s", r.err)
		}
		o.floor = append(o.floor, r)
	}
}

func (o *orchestrator) runFloorRow(ctx context.Context, fs *child, row rowSpec) floorResult {
	res := floorResult{row: row}
	cl := o.clients.hello.Ctl
	var open openResult
	err := call(ctx, 60*time.Second, cl, "/floor/open", url.Values{"addr": {fs.hello.WS}, "n": {fmt.Sprint(row.clients)}}, nil, &open)
	defer func() { _ = call(context.Background(), 30*time.Second, cl, "/floor/close", nil, nil, nil) }()
	if err == nil && open.Errors > 0 {
		err = fmt.Errorf("%d of %d connections failed: %s", open.Errors, row.clients, open.FirstErr)
	}
	if err != nil {
		res.err = "open: " + err.Error()
		return res
	}
	var before, after serverStats
	if err := call(ctx, 10*time.Second, fs.hello.Ctl, "/stats", nil, nil, &before); err != nil {
		res.err = "stats: " + err.Error()
		return res
	}
	span := time.Duration(float64(row.changes) / row.rate * float64(time.Second))
	err = call(ctx, span+60*time.Second, fs.hello.Ctl, "/run", url.Values{
		"conns": {fmt.Sprint(row.clients)}, "n": {fmt.Sprint(row.changes)}, "rate": {fmt.Sprint(row.rate)},
	}, nil, &res.run)
	if err != nil {
		res.err = "run: " + err.Error()
		return res
	}
	frame := int64(len(floorFrame()))
	var fw floorWait
	waitErr := call(ctx, 32*time.Second, cl, "/floor/wait", url.Values{"bytes": {fmt.Sprint(int64(row.changes) * frame)}}, nil, &fw)
	if err := call(ctx, 10*time.Second, fs.hello.Ctl, "/stats", nil, nil, &after); err != nil {
		res.err = "stats: " + err.Error()
		return res
	}
	res.cpuNs = after.CPUNanos - before.CPUNanos
	res.frames = fw.Bytes / frame
	switch {
	case waitErr != nil:
		res.err = "wait: " + waitErr.Error()
	case !fw.OK:
		res.err = fmt.Sprintf("%d connections short of the last frame after 30 s", fw.Behind)
	case res.run.Errors > 0:
		res.err = fmt.Sprintf("%d write errors: %s", res.run.Errors, res.run.FirstErr)
	}
	return res
}
