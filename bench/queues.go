//go:build linux

package main

// The queue comparison (go run ./bench -queues): the same two measurements
// on every queue the library ships, one table.
//
// For each queue the orchestrator starts a servers process built on that
// queue (two entitysync servers, each with its own queue instance on the
// broker; one server for the in-process queue) and a clients process whose
// connections all go to the last server, while the changes are made and
// notified on server 0. So every delivery crossed the broker, except with
// the in-process queue, where there is only one server. Then:
//
//   - latency: qClients clients on one key, qRate changes/s for qFor, each
//     change a NotifyAllOfChange; notify -> client read, on the machine's
//     clock, over every frame (after a warm-up of a few changes, not
//     recorded);
//   - throughput: qWriters goroutines calling NotifyAllOfChange for a key
//     nobody subscribes to (no fetch, no delivery) for qTputFor; calls/s,
//     and whether every server's bridge received every notification.
//
// A broker that does not answer a TCP dial is skipped and its row says so;
// that is not an error. Every run uses its own topic, subject or channel
// prefix, so runs (and other programs on the same brokers) never mix.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esq/natsq"
	"github.com/entity-sync/entity-sync/esq/pgq"
	"github.com/entity-sync/entity-sync/esq/redisq"
	"github.com/entity-sync/entity-sync/internal/childproc"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
)

// newQueue builds the servers process's queue for -queue (one per server).
func newQueue(cfg config, log logrus.FieldLogger) (esq.Queue, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	switch cfg.queue {
	case "memory":
		return esq.NewMemory(), nil
	case "nsq":
		if cfg.nsqd == "" {
			return nil, errors.New("-queue nsq needs -nsqd")
		}
		return esq.NewNSQ(esq.NSQConfig{NSQDAddrs: []string{cfg.nsqd}, TopicPrefix: cfg.queuePrefix, Logger: log})
	case "postgres":
		return pgq.New(ctx, pgq.Config{ConnString: cfg.pgDSN, Channel: cfg.queuePrefix, Logger: log})
	case "nats":
		return natsq.New(ctx, natsq.Config{URL: cfg.natsURL, SubjectPrefix: cfg.queuePrefix, Logger: log, RouteByKey: cfg.routeByKey})
	case "redis":
		return redisq.New(ctx, redisq.Config{Addr: cfg.redisAddr, ChannelPrefix: cfg.queuePrefix, Logger: log, RouteByKey: cfg.routeByKey})
	}
	return nil, fmt.Errorf("unknown -queue %q (memory | nsq | postgres | nats | redis)", cfg.queue)
}

// queueKind is one row of the comparison.
type queueKind struct {
	key, name string
	returns   string // what a NotifyAllOfChange call waits for
	dial      string // host:port that must answer, else the row is skipped
	prefix    string
}

func queueKinds(cfg config, run string) []queueKind {
	return []queueKind{
		{key: "memory", name: "in-process (`esq.NewMemory`)",
			returns: "the server's own handler ran (Publish calls it)"},
		{key: "nsq", name: "NSQ (`esq.NewNSQ`, nsqd v1.3.0 embedded in the orchestrator)", prefix: "esbench-" + run + "-",
			returns: "nsqd acknowledged it"},
		{key: "postgres", name: "Postgres (`pgq`, LISTEN/NOTIFY)", dial: urlHost(cfg.pgDSN, "5432"), prefix: "es_bench_" + run,
			returns: "`SELECT pg_notify` committed (pool of the default size)"},
		{key: "nats", name: "NATS (`natsq`, core pub/sub)", dial: urlHost(cfg.natsURL, "4222"), prefix: "esbench." + run + ".",
			returns: "nats.go buffered it (no round trip)"},
		{key: "redis", name: "Redis (`redisq`, pub/sub)", dial: cfg.redisAddr, prefix: "esbench:" + run + ":",
			returns: "Redis answered the PUBLISH"},
	}
}

// urlHost is the host:port of a URL-shaped address, "" when it has none
// (then the row is not pre-checked and the queue's constructor decides).
func urlHost(s, defPort string) string {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" {
		return ""
	}
	if u.Port() == "" {
		return net.JoinHostPort(u.Hostname(), defPort)
	}
	return u.Host
}

// queueResult is one row's cells.
type queueResult struct {
	servers, latency, delivered, calls, tput, received string
	failed                                             bool
}

func runQueues(cfg config) int {
	start := time.Now()
	host := readHost()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	run := hex.EncodeToString(b)
	o := &orchestrator{cfg: cfg, http: &http.Client{}}
	code := 0
	var rows []string
	for _, k := range queueKinds(cfg, run) {
		qstart := time.Now()
		progress("queue %s", k.key)
		r := o.queueRow(k)
		if r.failed {
			code = 1
		}
		rows = append(rows, fmt.Sprintf("| %s | %s | %s | %s | %s | %s | %s | %s |", k.name, r.servers, r.latency, r.delivered, k.returns, r.calls, r.tput, r.received))
		o.timings = append(o.timings, fmt.Sprintf("%s %.1fs", k.key, time.Since(qstart).Seconds()))
	}
	end := readHost()

	var s strings.Builder
	fmt.Fprintf(&s, "\n| queue | servers | notify -> client p50 / p99 (max), %d clients, %d changes/s for %s | states delivered | a NotifyAllOfChange call returns once | its duration p50 / p99 in that run | notify throughput, %d goroutines for %s, a key with no subscriber | every server received every notification |\n",
		cfg.qClients, cfg.qRate, cfg.qFor, cfg.qWriters, cfg.qTputFor)
	s.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range rows {
		s.WriteString(r + "\n")
	}
	fmt.Fprintf(&s, "\ncommand: `%s`; %s %s/%s, GOMAXPROCS=%d, NumCPU=%d; servers in one process (entitysync.New{Queue: q}, one queue per server), clients in another, all on 127.0.0.1; prefixes esbench-%s- / es_bench_%s / esbench.%s. / esbench:%s:; total %.1fs\n",
		strings.Join(append([]string{"go run ./bench"}, os.Args[1:]...), " "), runtime.Version(), runtime.GOOS, runtime.GOARCH,
		runtime.GOMAXPROCS(0), runtime.NumCPU(), run, run, run, run, time.Since(start).Seconds())
	fmt.Fprintf(&s, "queues: %s\n", strings.Join(o.timings, ", "))
	if span := end.total - host.total; span > 0 {
		fmt.Fprintf(&s, "host during the run: load average %s at start, %s at end; CPU busy %.0f%% of the %d cores' capacity, this benchmark's processes %.0f%% (brokers other than the embedded nsqd are not counted as this benchmark's)\n",
			host.loadavg, end.loadavg, 100*(end.busy-host.busy)/span, runtime.NumCPU(), 100*(end.own-host.own)/span)
	}
	for _, n := range o.notes {
		fmt.Fprintf(&s, "note: %s\n", n)
	}
	fmt.Print(s.String())
	return code
}

// warmup is how many changes each queue carries, four at a time, before the
// latency run.
const warmup = 20

// queueRow measures one queue; every failure ends up in the row.
func (o *orchestrator) queueRow(k queueKind) (r queueResult) {
	cfg := o.cfg
	const na = "–"
	r = queueResult{servers: na, latency: na, delivered: na, calls: na, tput: na, received: na}
	fail := func(cell *string, what string, err error) queueResult {
		progress("queue %s: %s: %v", k.key, what, err)
		*cell = "ERROR: " + what + ": " + oneLine(err.Error())
		r.failed = true
		return r
	}
	if k.dial != "" {
		c, err := net.DialTimeout("tcp", k.dial, 2*time.Second)
		if err != nil {
			progress("queue %s: no broker at %s: %v", k.key, k.dial, err)
			r.servers = fmt.Sprintf("skipped: no broker answers at %s (%s)", k.dial, oneLine(err.Error()))
			return r
		}
		_ = c.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	o.budget = ctx

	args := []string{"-queue", k.key, "-queue-prefix", k.prefix, "-pg", cfg.pgDSN, "-nats", cfg.natsURL, "-redis", cfg.redisAddr}
	if k.key == "nsq" {
		broker, err := nsqtest.Embed()
		if err != nil {
			return fail(&r.servers, "embedded nsqd", err)
		}
		defer broker.Close()
		args = append(args, "-nsqd", broker.TCPAddr())
	}
	o.servers = serversHello{}
	servers, err := childproc.Spawn("servers", 30*time.Second, &o.servers, args...)
	defer func() {
		if err := servers.Stop(); err != nil {
			o.notes = append(o.notes, k.key+": servers process exit: "+err.Error())
		}
	}()
	if err != nil {
		return fail(&r.servers, "servers process", err)
	}
	last := len(o.servers.WS) - 1
	if last == 0 {
		r.servers = "1 (clients and changes on the same server: nothing crosses a broker)"
	} else {
		r.servers = fmt.Sprintf("%d (clients on server %d, changes notified on server 0)", last+1, last)
	}

	o.clients = clientsHello{}
	clients, err := childproc.Spawn("clients", 30*time.Second, &o.clients, "-servers", o.servers.WS[last])
	defer func() { _ = clients.Stop() }()
	if err != nil {
		return fail(&r.latency, "clients process", err)
	}

	// Latency.
	n := cfg.qClients
	changes := int(float64(cfg.qRate) * cfg.qFor.Seconds())
	if _, err := o.open(ctx, n, 30*time.Second); err != nil {
		return fail(&r.latency, "open", err)
	}
	if _, err := o.subscribe(ctx, "hot", n, false, 30*time.Second); err != nil {
		return fail(&r.latency, "subscribe", err)
	}
	// Warm-up, not recorded: the queue's first publishes open connections
	// (Postgres's pool opens them on demand).
	wu, err := o.bump(ctx, "hot", warmup, 0, 4, false, 30*time.Second)
	if err != nil {
		return fail(&r.latency, "warm-up", err)
	}
	if _, err := o.wait(ctx, "hot", wu.LastVersion, n, 20*time.Second); err != nil {
		return fail(&r.latency, "warm-up", err)
	}
	if _, err := o.record(ctx, true); err != nil {
		return fail(&r.latency, "record", err)
	}
	br, err := o.bump(ctx, "hot", changes, float64(cfg.qRate), 1, false, cfg.qFor+30*time.Second)
	if err != nil {
		return fail(&r.latency, "notify", err)
	}
	if _, err := o.wait(ctx, "hot", br.LastVersion, n, 20*time.Second); err != nil {
		return fail(&r.latency, "wait for the last change", err)
	}
	rec, err := o.record(ctx, false)
	if err != nil {
		return fail(&r.latency, "record", err)
	}
	r.latency = fmt.Sprintf("%s / %s (%s)", ms(rec.P50), ms(rec.P99), ms(rec.Max))
	r.delivered = fmt.Sprintf("%.1f%% (%d frames of %d changes x %d clients)", 100*float64(rec.Frames)/float64(changes*n), rec.Frames, changes, n)
	r.calls = fmt.Sprintf("%s / %s", ms(br.NotifyP50), ms(br.NotifyP99))

	// Throughput.
	before, err := o.stats(ctx, false)
	if err != nil {
		return fail(&r.tput, "stats", err)
	}
	var tr bumpResult
	query := q("id", "nobody", "n", 10_000_000, "conc", cfg.qWriters, "dur_ms", cfg.qTputFor.Milliseconds())
	err = o.call(ctx, cfg.qTputFor+30*time.Second, o.servers.Ctl[0], "/ctl/bump", query, &tr)
	if err == nil && tr.Errors > 0 {
		err = fmt.Errorf("%d of %d notifies failed: %s", tr.Errors, tr.N, tr.FirstError)
	}
	if err != nil {
		return fail(&r.tput, "notify", err)
	}
	secs := float64(tr.Done-tr.FirstNotify) / 1e9
	r.tput = fmt.Sprintf("%.0f calls/s (%d in %.2f s; call p50 %s, p99 %s)", float64(tr.N)/secs, tr.N, secs, ms(tr.NotifyP50), ms(tr.NotifyP99))
	waitStart := time.Now()
	after, err := o.waitReceived(ctx, before, tr.N)
	if err != nil {
		return fail(&r.received, "stats", err)
	}
	all := true
	var per []string
	var resyncs uint64
	for i := range after {
		got := after[i].Bridge.Received - before[i].Bridge.Received
		all = all && got >= uint64(tr.N)
		per = append(per, fmt.Sprint(got))
		resyncs += after[i].Bridge.Resyncs - before[i].Bridge.Resyncs
	}
	if all {
		r.received = fmt.Sprintf("yes: %s of %d (all counted %.2f s after the calls returned)", strings.Join(per, " / "), tr.N,
			time.Since(waitStart).Seconds())
	} else {
		r.received = fmt.Sprintf("**no**: %s of %d after 10 s", strings.Join(per, " / "), tr.N)
	}
	if resyncs > 0 {
		r.received += fmt.Sprintf("; loss detected: %d re-fetch(es)", resyncs)
	}
	return r
}
