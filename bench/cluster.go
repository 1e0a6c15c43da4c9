//go:build linux

package main

// The cluster benchmark (go run ./bench -cluster): what each server of a
// cluster pays per change as servers are added, on each queue that connects
// servers (NSQ, NATS, Redis, Postgres).
//
// Processes: the orchestrator (the writer, and nsqd embedded for the NSQ
// rows), one process per entity-sync server (-role cserver: one
// entitysync.New on the queue under test), and one clients process holding
// every websocket connection. The "database" is a file of one int64 per key
// that every process maps into memory (clusterStore): the writer stores a
// key's new version there, a server's fetch function reads it, so a fetch
// costs the servers next to nothing and the servers' CPU is entity-sync's.
//
// Keys are the ranks 0 .. keys-1 of a Zipf distribution (exponent
// -cluster-zipf). Each server gets -cluster-clients clients, each watching
// -cluster-subs distinct keys drawn from that distribution (from a random
// source seeded by the server's index, so a server watches the same keys at
// every cluster size), and the writer changes keys drawn from the same
// distribution: popular keys are both watched and changed more. A change is
// one NotifyAllOfChange from the orchestrator's own entitysync instance,
// which serves no entity type (a writer, not a server), at -cluster-rate
// changes per second for -cluster-for.
//
// Per queue, the cluster grows: 2 servers, then 2 more, then 4 more, and so
// on through -cluster-n, each new server with its clients; every size is
// measured in turn. Per size, over the measured changes:
//
//   - received per server per change: Stats().Received (queue messages
//     delivered to the server's bridge) divided by changes, mean and range
//     over the servers;
//   - interested share: the share of those changes whose key at least one of
//     the server's clients watches (computed by the orchestrator from the
//     subscriptions it made and the changes it drew), mean and range; then
//     the largest received / interested ratio among the servers;
//   - fetches per change: Stats().Fetches summed over the servers, next to
//     the sum of the interested shares (one fetch per interested server);
//   - server CPU per change: each server process's CPU time over the
//     measurement (from /proc/PID/task/*/schedstat, so nothing runs in the
//     servers to measure it) divided by changes: the mean per server and the
//     sum over the cluster;
//   - visible latency: change -> a client reads the new state, over every
//     frame the clients received, on the machine's clock;
//   - the same received count and CPU for one more server process that has
//     no clients (the observer, not counted in the cluster's figures): what
//     receiving alone costs at this rate.
//
// Server CPU is net of each process's idle CPU, measured for -cluster-idle
// just before. Before any cluster server starts, the writer also notifies a
// key nobody watches as fast as 16 goroutines can for -cluster-burst, and
// the observer's CPU per notification received is the receive cost when
// notifications arrive in batches (the second table).
//
// A broker that does not answer a TCP dial is skipped and its row says so.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/internal/childproc"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/shared"
)

// clusterStore is the cluster's database: one version per key in a file
// every process maps. A version is the UnixNano time of the change that
// made it (made strictly increasing per key by the one writer), so a client
// reads the change's time from the row it receives.
type clusterStore struct {
	data []byte
	vals []int64
}

func openClusterStore(path string, keys int, create bool) (*clusterStore, error) {
	flags := os.O_RDWR
	if create {
		flags |= os.O_CREATE | os.O_EXCL
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	size := keys * 8
	if create {
		if err := f.Truncate(int64(size)); err != nil {
			return nil, err
		}
	}
	data, err := syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap %s: %w", path, err)
	}
	// The mapping is page aligned, so every int64 in it is 8-byte aligned
	// and atomic loads and stores on it are valid across processes.
	return &clusterStore{data: data, vals: unsafe.Slice((*int64)(unsafe.Pointer(&data[0])), keys)}, nil
}

func (s *clusterStore) close() { _ = syscall.Munmap(s.data) }

func (s *clusterStore) get(i int) int64 { return atomic.LoadInt64(&s.vals[i]) }

// bump gives key i a new version (the writer is the only caller).
func (s *clusterStore) bump(i int) int64 {
	v := max(time.Now().UnixNano(), s.get(i)+1)
	atomic.StoreInt64(&s.vals[i], v)
	return v
}

func (s *clusterStore) fetch(_ context.Context, key shared.EntityKey) ([][]byte, error) {
	i, err := strconv.Atoi(key.ID)
	if err != nil || i < 0 || i >= len(s.vals) {
		return nil, nil // no such row: the client is told the key is gone
	}
	v := s.get(i)
	return [][]byte{appendRow(make([]byte, 0, 96), key.ID, v, v)}, nil
}

// zipf draws ranks 0 .. n-1 with P(k) proportional to 1/(k+1)^s (any s >= 0;
// math/rand's Zipf needs s > 1).
type zipf struct{ cdf []float64 }

func newZipf(n int, s float64) *zipf {
	z := &zipf{cdf: make([]float64, n)}
	sum := 0.0
	for k := range n {
		sum += math.Pow(float64(k+1), -s)
		z.cdf[k] = sum
	}
	for k := range z.cdf {
		z.cdf[k] /= sum
	}
	return z
}

func (z *zipf) draw(r *mrand.Rand) int {
	return min(sort.SearchFloat64s(z.cdf, r.Float64()), len(z.cdf)-1)
}

// clusterHello is a cserver process's first stdout line.
type clusterHello struct {
	WS  string `json:"ws"`
	Ctl string `json:"ctl"`
	Pid int    `json:"pid"`
	// Routes: the queue delivers a key's notifications only to servers
	// watching it (esq.Routing), rather than broadcasting.
	Routes bool   `json:"routes"`
	Err    string `json:"err,omitempty"`
}

// runClusterServer is the cserver role: one entity-sync server on -queue,
// fetching from the -cluster-store file, with /ctl/stats.
func runClusterServer(cfg config) int {
	log := logrus.New()
	log.SetOutput(os.Stderr)
	log.SetLevel(logrus.WarnLevel)
	if cfg.verbose {
		log.SetLevel(logrus.InfoLevel)
	}
	hello := clusterHello{Pid: os.Getpid()}
	fail := func(err error) int {
		hello.Err = err.Error()
		_ = json.NewEncoder(os.Stdout).Encode(hello)
		return 1
	}
	db, err := openClusterStore(cfg.clusterStore, cfg.clusterKeys, false)
	if err != nil {
		return fail(err)
	}
	defer db.close()
	q, err := newQueue(cfg, log)
	if err != nil {
		return fail(fmt.Errorf("%s queue: %w", cfg.queue, err))
	}
	hello.Routes = esq.Routing(q) != nil
	es, err := entitysync.New(entitysync.Config{Queue: q, Logger: log})
	if err != nil {
		return fail(err)
	}
	if err := es.Register(entity, db.fetch); err != nil {
		return fail(fmt.Errorf("register: %w", err))
	}
	es.Mux.HandleFunc("/ctl/stats", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, es.Bridge.Stats())
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fail(err)
	}
	srv := &http.Server{Handler: es.Mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.WithError(err).Error("serve")
		}
	}()
	hello.WS = "ws://" + l.Addr().String() + shared.WebsocketPath
	hello.Ctl = "http://" + l.Addr().String()
	if err := json.NewEncoder(os.Stdout).Encode(hello); err != nil {
		return 1
	}
	childproc.WaitForParent(childLifetime)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	code := 0
	if err := es.Close(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "bench cserver: close: %v\n", err)
		code = 1
	}
	_ = srv.Close()
	return code
}

// procCPU is a process's CPU time in nanoseconds: the sum over its threads
// of /proc/PID/task/TID/schedstat's first field (time on a CPU, to the
// nanosecond, unlike /proc/PID/stat's clock ticks).
func procCPU(pid int) (int64, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var sum int64
	for _, t := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, t.Name(), "schedstat"))
		if err != nil {
			continue // the thread exited meanwhile
		}
		f, _, _ := strings.Cut(string(b), " ")
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s/%s/schedstat: %q", dir, t.Name(), b)
		}
		sum += n
	}
	return sum, nil
}

// cserver is a running server process and the keys its clients watch.
type cserver struct {
	hello   clusterHello
	child   *childproc.Child
	watched map[int]bool
}

// clusterRow is one (queue, size) measurement.
type clusterRow struct {
	queue, n, clients, changes, received, share, ratio, deliveries, fetches, cpu, observer, latency string
	failed                                                                                          bool

	// For the targets: the variant's name, servers, worst received /
	// interested ratio, fetches and interested shares per change, p99 (ns).
	variant                        string
	servers                        int
	worstRatio, fetchPer, shareSum float64
	p99                            int64
	measured                       bool
}

func runCluster(cfg config) int {
	start := time.Now()
	host := readHost()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	run := hex.EncodeToString(b)
	sizes, err := parseSizes(cfg.clusterN)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: -cluster-n: %v\n", err)
		return 2
	}
	dir := "/dev/shm"
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		dir = os.TempDir()
	}
	cfg.clusterStore = filepath.Join(dir, "esbench-cluster-"+run)
	db, err := openClusterStore(cfg.clusterStore, cfg.clusterKeys, true)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: store: %v\n", err)
		return 1
	}
	defer os.Remove(cfg.clusterStore)
	defer db.close()

	o := &orchestrator{cfg: cfg, http: &http.Client{}}
	kinds := map[string]queueKind{}
	for _, k := range queueKinds(cfg, run) {
		kinds[k.key] = k
	}
	code := 0
	var rows []clusterRow
	for _, name := range strings.Split(cfg.clusterQueues, ",") {
		name = strings.TrimSpace(name)
		base, routed := strings.CutSuffix(name, "-routed")
		k, ok := kinds[base]
		if !ok || k.key == "memory" || routed && !routable[base] {
			fmt.Fprintf(os.Stderr, "bench: -cluster-queues: unknown queue %q (nsq | nats | redis | postgres | nats-routed | redis-routed)\n", name)
			return 2
		}
		if routed {
			k.prefix += "r" // its own subjects: routed and broadcast servers do not hear each other
		}
		k.name = name // the cluster's tables name the variant
		qstart := time.Now()
		progress("cluster %s", k.name)
		got := o.clusterQueue(k, routed, sizes, db)
		for _, r := range got {
			if r.failed {
				code = 1
			}
		}
		rows = append(rows, got...)
		o.timings = append(o.timings, fmt.Sprintf("%s %.1fs", k.name, time.Since(qstart).Seconds()))
	}
	end := readHost()

	var s strings.Builder
	fmt.Fprintf(&s, "\n| queue | servers | clients (subscriptions) | changes measured | received per server per change: mean (min – max) | interested share: mean (min – max) | received / interested, worst server | broker deliveries to servers per change | fetches per change (one per interested server: sum of shares) | server CPU per change: per server mean; all servers | one more server with no clients: received per change; CPU per change | visible p50 / p99 (max) |\n")
	s.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range rows {
		fmt.Fprintf(&s, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
			r.queue, r.n, r.clients, r.changes, r.received, r.share, r.ratio, r.deliveries, r.fetches, r.cpu, r.observer, r.latency)
	}
	if t := clusterTargets(rows); t != "" {
		s.WriteString(t)
	}
	if len(o.receive) > 0 {
		fmt.Fprintf(&s, "\n| queue | notifications of a key nobody watches, 16 goroutines for %s | received by a server with no clients (the only server yet) | its CPU per notification received |\n", cfg.clusterBurst)
		s.WriteString("| --- | --- | --- | --- |\n")
		for _, l := range o.receive {
			s.WriteString(l + "\n")
		}
	}
	fmt.Fprintf(&s, "\ncommand: `%s`; %s %s/%s, NumCPU=%d; %d keys, Zipf exponent %g for subscriptions and changes; per server %d clients watching %d distinct keys each; %d changes/s for %s per size (after %d warm-up changes), each a NotifyAllOfChange from a writer process that serves nothing; every server its own process, clients in one more, nsqd embedded in the writer, the other brokers the machine's, all on 127.0.0.1; total %.1fs\n",
		strings.Join(append([]string{"go run ./bench"}, os.Args[1:]...), " "), runtime.Version(), runtime.GOOS, runtime.GOARCH, runtime.NumCPU(),
		cfg.clusterKeys, cfg.clusterZipf, cfg.clusterClients, cfg.clusterSubs, cfg.clusterRate, cfg.clusterFor, clusterWarmup, time.Since(start).Seconds())
	fmt.Fprintf(&s, "queues: %s\n", strings.Join(o.timings, ", "))
	if span := end.total - host.total; span > 0 {
		fmt.Fprintf(&s, "host during the run: load average %s at start, %s at end; CPU busy %.0f%% of the %d cores' capacity, this benchmark's processes %.0f%% (the NATS, Redis and Postgres servers are not counted as this benchmark's)\n",
			host.loadavg, end.loadavg, 100*(end.busy-host.busy)/span, runtime.NumCPU(), 100*(end.own-host.own)/span)
	}
	for _, n := range o.notes {
		fmt.Fprintf(&s, "note: %s\n", n)
	}
	fmt.Print(s.String())
	return code
}

// routable is the queues that can route by key (-route-by-key).
var routable = map[string]bool{"nats": true, "redis": true}

// clusterTargets checks each routed variant against its broadcast run: at
// the largest size, every server receives at most 1.2 times its interested
// share; fetches per change stay at most one per interested server (the
// sum of shares, 1% allowed for rounding), at every size; visible p99 at
// the smallest size is no worse than broadcast's there. "" when no pair
// ran.
func clusterTargets(rows []clusterRow) string {
	byVariant := map[string][]clusterRow{}
	var names []string
	for _, r := range rows {
		if !r.measured {
			continue
		}
		if byVariant[r.variant] == nil {
			names = append(names, r.variant)
		}
		byVariant[r.variant] = append(byVariant[r.variant], r)
	}
	var b strings.Builder
	for _, name := range names {
		base, routed := strings.CutSuffix(name, "-routed")
		bc := byVariant[base]
		if !routed || len(bc) == 0 {
			continue
		}
		rt := byVariant[name]
		last := rt[len(rt)-1]
		verdict := func(ok bool) string {
			if ok {
				return "met"
			}
			return "**not met**"
		}
		fetchOK := true
		var fetchCells []string
		for _, r := range rt {
			// Fewer is fine: changes of one key close together share a fetch.
			fetchOK = fetchOK && r.fetchPer <= r.shareSum*1.01
			cell := fmt.Sprintf("%d servers: %.2f (interested %.2f", r.servers, r.fetchPer, r.shareSum)
			for _, x := range bc {
				if x.servers == r.servers {
					cell += fmt.Sprintf(", %s %.2f", base, x.fetchPer)
				}
			}
			fetchCells = append(fetchCells, cell+")")
		}
		if b.Len() == 0 {
			b.WriteString("\n| queue | target | measured | verdict |\n| --- | --- | --- | --- |\n")
		}
		fmt.Fprintf(&b, "| %s | received per server per change at most 1.2 x its interested share, at %d servers | worst server %.2f x | %s |\n",
			name, last.servers, last.worstRatio, verdict(last.worstRatio <= 1.2))
		fmt.Fprintf(&b, "| %s | fetches per change: at most one per interested server, as with broadcast | %s | %s |\n",
			name, strings.Join(fetchCells, "; "), verdict(fetchOK))
		// p99 is compared at the smallest size both ran, where broadcast
		// costs least; the largest size is shown beside it.
		var cells []string
		ok := false
		for i, r := range rt {
			for _, x := range bc {
				if x.servers == r.servers && (i == 0 || i == len(rt)-1) {
					cells = append(cells, fmt.Sprintf("%d servers: %s vs %s", r.servers, ms(r.p99), ms(x.p99)))
					if i == 0 {
						ok = r.p99 <= x.p99
					}
				}
			}
		}
		fmt.Fprintf(&b, "| %s | visible p99 no worse than %s's at %d servers | %s | %s |\n",
			name, base, rt[0].servers, strings.Join(cells, "; "), verdict(ok))
	}
	return b.String()
}

// clusterWarmup is how many changes each size carries before it is measured:
// new servers' first deliveries open buffers and fill caches.
const clusterWarmup = 30

func parseSizes(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a server count", f)
		}
		if len(out) > 0 && n <= out[len(out)-1] {
			return nil, fmt.Errorf("server counts must grow: %s", s)
		}
		out = append(out, n)
	}
	return out, nil
}

// clusterQueue measures every size on one queue; every failure ends up in
// a row.
func (o *orchestrator) clusterQueue(k queueKind, routed bool, sizes []int, db *clusterStore) (rows []clusterRow) {
	cfg := o.cfg
	const na = "–"
	row := func(n int) clusterRow {
		return clusterRow{queue: k.name, n: strconv.Itoa(n), clients: na, changes: na, received: na, share: na, ratio: na, deliveries: na, fetches: na, cpu: na, observer: na, latency: na}
	}
	failAt := func(n int, what string, err error) []clusterRow {
		progress("cluster %s: %d servers: %s: %v", k.name, n, what, err)
		r := row(n)
		r.clients = "ERROR: " + what + ": " + oneLine(err.Error())
		r.failed = true
		return append(rows, r)
	}
	if k.dial != "" {
		c, err := net.DialTimeout("tcp", k.dial, 2*time.Second)
		if err != nil {
			progress("cluster %s: no broker at %s: %v", k.name, k.dial, err)
			r := row(sizes[0])
			r.n = "skipped: no broker answers at " + k.dial
			return []clusterRow{r}
		}
		_ = c.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	args := []string{"-queue", k.key, "-queue-prefix", k.prefix, "-pg", cfg.pgDSN, "-nats", cfg.natsURL, "-redis", cfg.redisAddr,
		"-cluster-store", cfg.clusterStore, "-cluster-keys", strconv.Itoa(cfg.clusterKeys)}
	wcfg := cfg
	wcfg.queue, wcfg.queuePrefix, wcfg.routeByKey = k.key, k.prefix, routed
	if routed {
		args = append(args, "-route-by-key")
	}
	if k.key == "nsq" {
		broker, err := nsqtest.Embed()
		if err != nil {
			return failAt(sizes[0], "embedded nsqd", err)
		}
		defer broker.Close()
		args = append(args, "-nsqd", broker.TCPAddr())
		wcfg.nsqd = broker.TCPAddr()
	}
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	wq, err := newQueue(wcfg, log)
	if err != nil {
		return failAt(sizes[0], "writer's queue", err)
	}
	writer, err := entitysync.New(entitysync.Config{Queue: wq, Logger: log})
	if err != nil {
		return failAt(sizes[0], "writer", err)
	}
	defer func() {
		cctx, ccancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer ccancel()
		_ = writer.Close(cctx)
	}()

	o.clients = clientsHello{}
	clients, err := childproc.Spawn("clients", 30*time.Second, &o.clients, "-cluster")
	defer func() { _ = clients.Stop() }()
	if err != nil {
		return failAt(sizes[0], "clients process", err)
	}

	// The observer is a server with no clients, not counted in the
	// cluster's figures: what receiving alone costs.
	obs := &cserver{}
	obs.child, err = childproc.Spawn("cserver", 60*time.Second, &obs.hello, args...)
	if err != nil {
		return failAt(sizes[0], "observer server process", err)
	}
	var servers []*cserver
	defer func() {
		var wg sync.WaitGroup
		for _, s := range append(servers, obs) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := s.child.Stop(); err != nil {
					o.notes = append(o.notes, fmt.Sprintf("%s: server process exit: %v", k.name, err))
				}
			}()
		}
		wg.Wait()
	}()

	if cfg.clusterBurst > 0 {
		o.clusterReceiveCost(ctx, k.name, writer, obs)
	}

	z := newZipf(cfg.clusterKeys, cfg.clusterZipf)
	changes := int(float64(cfg.clusterRate) * cfg.clusterFor.Seconds())
	rng := mrand.New(mrand.NewPCG(1, 2))
	for _, n := range sizes {
		// Grow the cluster to n servers, each with its clients.
		added := make([]*cserver, n-len(servers))
		errs := make([]error, len(added))
		var wg sync.WaitGroup
		for i := range added {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s := &cserver{}
				s.child, errs[i] = childproc.Spawn("cserver", 60*time.Second, &s.hello, args...)
				added[i] = s
			}()
		}
		wg.Wait()
		for i, s := range added {
			if errs[i] == nil {
				servers = append(servers, s)
			}
		}
		if err := errors.Join(errs...); err != nil {
			return failAt(n, "server process", err)
		}
		for i := n - len(added); i < n; i++ {
			s := servers[i]
			conns := clusterSubscriptions(z, i, cfg.clusterClients, cfg.clusterSubs)
			s.watched = map[int]bool{}
			for _, c := range conns {
				for _, key := range c {
					s.watched[key] = true
				}
			}
			var res subscribeResult
			if err := postJSON(ctx, 60*time.Second, o.clients.Ctl+"/csubscribe", csubscribeReq{URL: s.hello.WS, Conns: conns}, &res); err != nil {
				return failAt(n, "subscribe", err)
			}
			if res.Errors > 0 || res.Missing > 0 {
				return failAt(n, "subscribe", fmt.Errorf("%d errors (%s), %d connections without every initial state", res.Errors, res.FirstErr, res.Missing))
			}
		}
		r := row(n)
		r.queue = k.key + " (broadcast)"
		if servers[0].hello.Routes {
			r.queue = k.key + " (routed by key)"
		}
		r.clients = fmt.Sprintf("%d (%d)", n*cfg.clusterClients, n*cfg.clusterClients*cfg.clusterSubs)

		// Warm-up, not measured.
		if _, err := o.clusterChanges(ctx, writer, db, z, rng, clusterWarmup); err != nil {
			return failAt(n, "warm-up", err)
		}
		all := append(slices.Clone(servers), obs)
		idle0, err := serversCPU(all)
		if err != nil {
			return failAt(n, "cpu", err)
		}
		time.Sleep(cfg.clusterIdle)
		idle1, err := serversCPU(all)
		if err != nil {
			return failAt(n, "cpu", err)
		}
		before, err := o.clusterStats(ctx, all)
		if err != nil {
			return failAt(n, "stats", err)
		}
		cpuBefore, err := serversCPU(all)
		if err != nil {
			return failAt(n, "cpu", err)
		}
		var rec recordResult
		if err := o.call(ctx, 10*time.Second, o.clients.Ctl, "/record", q("on", 1), &rec); err != nil {
			return failAt(n, "record", err)
		}
		measured := time.Now()
		drawn, err := o.clusterChanges(ctx, writer, db, z, rng, changes)
		if err != nil {
			return failAt(n, "changes", err)
		}
		after, err := o.clusterSettle(ctx, all)
		if err != nil {
			return failAt(n, "settle", err)
		}
		cpuAfter, err := serversCPU(all)
		if err != nil {
			return failAt(n, "cpu", err)
		}
		span := time.Since(measured)
		if err := o.call(ctx, 10*time.Second, o.clients.Ctl, "/record", q("on", 0), &rec); err != nil {
			return failAt(n, "record", err)
		}

		c := float64(changes)
		var recv, shares, ratios, cpus, idles []float64
		var fetches uint64
		var recvSum float64
		for i, s := range servers {
			got := float64(after[i].Received - before[i].Received)
			recvSum += got
			recv = append(recv, got/c)
			hit := 0
			for _, key := range drawn {
				if s.watched[key] {
					hit++
				}
			}
			share := float64(hit) / c
			shares = append(shares, share)
			if share > 0 {
				ratios = append(ratios, got/c/share)
			}
			fetches += after[i].Fetches - before[i].Fetches
			idle := float64(idle1[i]-idle0[i]) / cfg.clusterIdle.Seconds() // CPU ns per second with nothing to do
			idles = append(idles, idle)
			cpus = append(cpus, (float64(cpuAfter[i]-cpuBefore[i])-idle*span.Seconds())/c)
		}
		r.changes = strconv.Itoa(changes)
		r.received = meanRange(recv, "%.2f")
		r.share = meanRange(shares, "%.2f")
		if len(ratios) > 0 {
			r.ratio = fmt.Sprintf("%.2f", slices.Max(ratios))
			r.worstRatio = slices.Max(ratios)
		}
		r.deliveries = fmt.Sprintf("%.2f", recvSum/c)
		r.fetches = fmt.Sprintf("%.2f (%.2f)", float64(fetches)/c, sum(shares))
		r.variant, r.servers, r.fetchPer, r.shareSum, r.p99, r.measured = k.name, n, float64(fetches)/c, sum(shares), rec.P99, true
		r.cpu = fmt.Sprintf("%.0f µs; %.0f µs (idle %.1f ms/s per server subtracted)", mean(cpus)/1e3, sum(cpus)/1e3, mean(idles)/1e6)
		idle := float64(idle1[n]-idle0[n]) / cfg.clusterIdle.Seconds()
		// Net of idle it can come out a little below zero when it
		// received nothing: shown as 0.
		r.observer = fmt.Sprintf("%.2f; %.0f µs", float64(after[n].Received-before[n].Received)/c,
			max(0, (float64(cpuAfter[n]-cpuBefore[n])-idle*span.Seconds())/c/1e3))
		r.latency = fmt.Sprintf("%s / %s (%s), %d frames", ms(rec.P50), ms(rec.P99), ms(rec.Max), rec.Frames)
		rows = append(rows, r)
		progress("cluster %s: %d servers: received %s, share %s, cpu %s, latency %s", k.name, n, r.received, r.share, r.cpu, r.latency)
	}
	return rows
}

// clusterSubscriptions is server i's clients: per client, subs distinct
// keys drawn from z, from a source seeded by i.
func clusterSubscriptions(z *zipf, i, clients, subs int) [][]int {
	r := mrand.New(mrand.NewPCG(uint64(i)+1000, 7))
	out := make([][]int, clients)
	for c := range out {
		seen := map[int]bool{}
		for len(out[c]) < min(subs, len(z.cdf)) {
			k := z.draw(r)
			if !seen[k] {
				seen[k] = true
				out[c] = append(out[c], k)
			}
		}
	}
	return out
}

// clusterChanges makes n changes of keys drawn from z at -cluster-rate per
// second, each notified in its own goroutine so a slow publish does not hold
// the next change back, then waits until every client holds the newest
// version of every key it watches. It returns the keys changed.
func (o *orchestrator) clusterChanges(ctx context.Context, writer *entitysync.EntitySync, db *clusterStore, z *zipf, rng *mrand.Rand, n int) ([]int, error) {
	interval := time.Duration(float64(time.Second) / float64(o.cfg.clusterRate))
	drawn := make([]int, n)
	var (
		wg       sync.WaitGroup
		failed   atomic.Int64
		firstErr atomic.Value
	)
	begin := time.Now()
	for i := range n {
		if d := time.Until(begin.Add(time.Duration(i) * interval)); d > 0 {
			time.Sleep(d)
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		key := z.draw(rng)
		drawn[i] = key
		db.bump(key)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := writer.NotifyAllOfChange(shared.EntityKey{Entity: entity, ID: strconv.Itoa(key)}); err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
			}
		}()
	}
	wg.Wait()
	if f := failed.Load(); f > 0 {
		return nil, fmt.Errorf("%d of %d notifies failed: %v", f, n, firstErr.Load())
	}
	want := map[string]int64{}
	for _, key := range drawn {
		want[strconv.Itoa(key)] = db.get(key)
	}
	var res waitResult
	if err := postJSON(ctx, 30*time.Second, o.clients.Ctl+"/cwait", cwaitReq{Versions: want}, &res); err != nil {
		return nil, err
	}
	if !res.OK {
		return nil, fmt.Errorf("%d subscriptions still behind after %.0f ms", res.Behind, res.Ms)
	}
	return drawn, nil
}

// clusterReceiveCost measures what a server pays to receive a notification
// it has no client for, when notifications come fast enough to be read in
// batches: before any other server joins, the writer notifies a key nobody
// watches from 16 goroutines for -cluster-burst, and the observer's CPU is
// divided by what it received. The result is a line of o.receive.
func (o *orchestrator) clusterReceiveCost(ctx context.Context, queue string, writer *entitysync.EntitySync, obs *cserver) {
	line := func(format string, args ...any) {
		o.receive = append(o.receive, fmt.Sprintf("| %s | "+format+" |", append([]any{queue}, args...)...))
	}
	fail := func(err error) {
		progress("cluster %s: receive cost: %v", queue, err)
		line("ERROR: %s | – | –", oneLine(err.Error()))
	}
	before, err := o.clusterStats(ctx, []*cserver{obs})
	if err != nil {
		fail(err)
		return
	}
	cpu0, err := procCPU(obs.hello.Pid)
	if err != nil {
		fail(err)
		return
	}
	var (
		wg     sync.WaitGroup
		sent   atomic.Int64
		errs   atomic.Int64
		first  atomic.Value
		stop   = time.Now().Add(o.cfg.clusterBurst)
		key    = shared.EntityKey{Entity: entity, ID: "nobody"}
		starts = time.Now()
	)
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) && ctx.Err() == nil {
				if err := writer.NotifyAllOfChange(key); err != nil {
					errs.Add(1)
					first.CompareAndSwap(nil, err.Error())
					continue
				}
				sent.Add(1)
			}
		}()
	}
	wg.Wait()
	secs := time.Since(starts).Seconds()
	if e := errs.Load(); e > 0 {
		fail(fmt.Errorf("%d notifies failed: %v", e, first.Load()))
		return
	}
	after, err := o.clusterSettle(ctx, []*cserver{obs})
	if err != nil {
		fail(err)
		return
	}
	cpu1, err := procCPU(obs.hello.Pid)
	if err != nil {
		fail(err)
		return
	}
	got := after[0].Received - before[0].Received
	if got == 0 {
		line("%d in %.1f s (%.0f/s) | 0 | –", sent.Load(), secs, float64(sent.Load())/secs)
		return
	}
	line("%d in %.1f s (%.0f/s) | %d | %.1f µs", sent.Load(), secs, float64(sent.Load())/secs, got, float64(cpu1-cpu0)/float64(got)/1e3)
}

func (o *orchestrator) clusterStats(ctx context.Context, servers []*cserver) ([]esbridge.Stats, error) {
	out := make([]esbridge.Stats, len(servers))
	for i, s := range servers {
		if err := o.call(ctx, 10*time.Second, s.hello.Ctl, "/ctl/stats", nil, &out[i]); err != nil {
			return nil, fmt.Errorf("server %d: %w", i, err)
		}
	}
	return out, nil
}

// clusterSettle returns the servers' stats once their received counts stop
// moving: every client is up to date already, so this only waits for
// servers whose clients did not need the last changes to finish reading
// them. Stable over 300 ms counts as done.
func (o *orchestrator) clusterSettle(ctx context.Context, servers []*cserver) ([]esbridge.Stats, error) {
	total := func(st []esbridge.Stats) (t uint64) {
		for _, s := range st {
			t += s.Received
		}
		return t
	}
	prev, err := o.clusterStats(ctx, servers)
	if err != nil {
		return nil, err
	}
	stable := time.Now()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond) // counters only; nothing to await
		cur, err := o.clusterStats(ctx, servers)
		if err != nil {
			return nil, err
		}
		if total(cur) != total(prev) {
			stable = time.Now()
		} else if time.Since(stable) >= 300*time.Millisecond {
			return cur, nil
		}
		prev = cur
	}
	return prev, nil
}

func serversCPU(servers []*cserver) ([]int64, error) {
	out := make([]int64, len(servers))
	for i, s := range servers {
		n, err := procCPU(s.hello.Pid)
		if err != nil {
			return nil, fmt.Errorf("server %d: %w", i, err)
		}
		out[i] = n
	}
	return out, nil
}

func sum(v []float64) (t float64) {
	for _, x := range v {
		t += x
	}
	return t
}

func mean(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	return sum(v) / float64(len(v))
}

func meanRange(v []float64, f string) string {
	if len(v) == 0 {
		return "–"
	}
	return fmt.Sprintf(f+" ("+f+" – "+f+")", mean(v), slices.Min(v), slices.Max(v))
}

// postJSON posts in as JSON and decodes the answer into out.
func postJSON(ctx context.Context, timeout time.Duration, u string, in, out any) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u+"?timeout_ms="+strconv.FormatInt((timeout-time.Second).Milliseconds(), 10), bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s: %s", u, resp.Status, strings.TrimSpace(string(b)))
	}
	return json.Unmarshal(b, out)
}

// csubscribeReq asks the clients process to open one connection per entry
// of Conns to URL, each subscribing to its keys.
type csubscribeReq struct {
	URL   string  `json:"url"`
	Conns [][]int `json:"conns"`
}

// cwaitReq asks the clients process to wait until every connection holds at
// least these versions of the keys it watches.
type cwaitReq struct {
	Versions map[string]int64 `json:"versions"`
}

// handleClusterSubscribe (/csubscribe) opens the connections of a
// csubscribeReq, subscribes each to its keys and waits until each has every
// key's initial state.
func (f *fleet) handleClusterSubscribe(w http.ResponseWriter, r *http.Request) {
	var req csubscribeReq
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeoutParam(r, 60*time.Second))
	defer cancel()
	start := time.Now()
	opened := make([]*bconn, len(req.Conns))
	res := subscribeResult{N: len(req.Conns)}
	res.Errors, res.FirstErr = parallel(ctx, len(req.Conns), func(i int) error {
		ws, resp, err := f.dialer.DialContext(ctx, req.URL, nil)
		if resp != nil && resp.Body != nil {
			resp.Body.Close()
		}
		if err != nil {
			return err
		}
		c := &bconn{ws: ws, keys: make(map[string]*seen, len(req.Conns[i]))}
		for _, k := range req.Conns[i] {
			c.subs = append(c.subs, strconv.Itoa(k))
		}
		opened[i] = c
		f.readers.Add(1)
		go f.read(c)
		for _, id := range c.subs {
			msg := `{"action":"subscribe","body":{"entity":"` + entity + `","id":` + strconv.Quote(id) + `}}`
			c.wmu.Lock()
			_ = ws.SetWriteDeadline(time.Now().Add(5 * time.Second))
			err := ws.WriteMessage(websocket.TextMessage, []byte(msg))
			c.wmu.Unlock()
			if err != nil {
				return err
			}
		}
		return nil
	})
	var conns []*bconn
	for _, c := range opened {
		if c != nil {
			conns = append(conns, c)
		}
	}
	f.mu.Lock()
	f.conns = append(f.conns, conns...)
	f.mu.Unlock()
	for {
		res.Missing = len(req.Conns) - len(conns)
		for _, c := range conns {
			c.mu.Lock()
			for _, id := range c.subs {
				if c.keys[id] == nil {
					res.Missing++
					break
				}
			}
			c.mu.Unlock()
		}
		if res.Missing == 0 || ctx.Err() != nil {
			break
		}
		time.Sleep(2 * time.Millisecond) // readers record arrivals; polling only ends the wait
	}
	res.Ms = msSince(start)
	writeJSON(w, res)
}

// handleClusterWait (/cwait) waits until every connection holds at least
// the cwaitReq's version of each key it watches.
func (f *fleet) handleClusterWait(w http.ResponseWriter, r *http.Request) {
	var req cwaitReq
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	f.mu.Lock()
	conns := slices.Clone(f.conns)
	f.mu.Unlock()
	deadline := time.Now().Add(timeoutParam(r, 30*time.Second))
	start := time.Now()
	res := waitResult{}
	for {
		res.Behind = 0
		for _, c := range conns {
			c.mu.Lock()
			for _, id := range c.subs {
				if want, ok := req.Versions[id]; ok {
					if s := c.keys[id]; s == nil || s.v < want {
						res.Behind++
					}
				}
			}
			c.mu.Unlock()
		}
		if res.Behind == 0 || time.Now().After(deadline) || r.Context().Err() != nil {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	res.OK = res.Behind == 0
	res.Ms = msSince(start)
	writeJSON(w, res)
}
