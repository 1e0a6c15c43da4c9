//go:build linux

// Command bench measures entity-sync end to end over a real nsqd, with the
// websocket clients in a different OS process from the servers, everything
// on 127.0.0.1. Run it with `make bench` or `go run ./bench`; it prints one
// markdown table and exits by itself (every phase has a timeout).
//
// One binary plays three roles, chosen by -role:
//
//   - orchestrator (the default) embeds nsqd, starts the two other roles as
//     child processes of itself, drives the phases over HTTP and prints the
//     table;
//   - servers runs two entity-sync servers (two entitysync.New instances on
//     the shared nsqd), each on its own listener with control endpoints under
//     /ctl/ (bump a key and notify, report bridge and process stats);
//   - clients opens websocket connections split across the servers and
//     reports received frames, versions and notify -> receive latencies over
//     its own HTTP control endpoint.
//
// With -queues (`make bench-queues`) the orchestrator instead compares the
// queues: for each of in-process, NSQ (embedded), Postgres, NATS and Redis
// (the machine's, at 127.0.0.1), it starts a servers process built on that
// queue (-queue) and a clients process, and prints one table of latency
// through the queue and notify throughput (queues.go). A broker that does
// not answer is skipped, and its row says so.
//
// With -collections (`make bench-collections`) the orchestrator instead
// measures a collection key (collections.go): the bytes a client reads per
// change when one row of a 500-row collection changes, as a diff and in
// full, and 1,000 clients holding it reconnecting at once without and with
// resume. One table.
//
// With -cluster (`make bench-cluster`) the orchestrator instead grows a
// cluster of server processes (-role cserver, one entity-sync server each)
// on each queue, 2 to 16 servers with Zipf-distributed subscriptions and
// changes over 10,000 keys, and prints what each server pays per change:
// notifications received, fetches, CPU, and the latency clients see
// (cluster.go). Two tables.
//
// The entity's fetch function returns one small JSON row holding the key,
// a version and the UnixNano time of the notify that made that version, so a
// client computes the notify -> receive latency on the same machine clock.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"syscall"
	"time"

	"github.com/entity-sync/entity-sync/internal/childproc"
)

// entity is the entity type every phase uses.
const entity = "bench"

func main() {
	var cfg config
	flag.StringVar(&cfg.role, "role", "orchestrator", "orchestrator | servers | clients | cserver (the last three are started by the orchestrator)")
	flag.StringVar(&cfg.nsqd, "nsqd", "", "servers: nsqd TCP address")
	flag.StringVar(&cfg.servers, "servers", "", "clients: comma-separated websocket URLs")
	flag.IntVar(&cfg.fanout, "fanout", 1000, "clients on the hot key (deliveries, latency, burst phases)")
	flag.IntVar(&cfg.rate, "rate", 200, "changes per second in the rate phase")
	flag.DurationVar(&cfg.rateFor, "rate-for", 5*time.Second, "duration of the rate phase")
	flag.BoolVar(&cfg.rateAsync, "rate-async", true, "run the rate phase a second time with NotifyAsync instead of NotifyAllOfChange")
	flag.IntVar(&cfg.lowRate, "low-rate", 20, "changes per second of a second latency measurement at a sustainable load (0: skip)")
	flag.IntVar(&cfg.burst, "burst", 10000, "changes in the burst phase")
	flag.IntVar(&cfg.idle, "idle", 10000, "idle connections in the memory phase")
	flag.IntVar(&cfg.changes, "changes", 20, "spaced changes per size in the fetches-per-change phase")
	flag.DurationVar(&cfg.budget, "budget", 200*time.Second, "time budget for all phases: a phase still running when it ends fails, and its row says so")
	flag.BoolVar(&cfg.verbose, "v", false, "let the children log at info level")
	flag.StringVar(&cfg.profile, "profile", "", "directory for pprof profiles: CPU of servers and clients during the rate phase, servers heap with the idle connections")
	flag.BoolVar(&cfg.queues, "queues", false, "instead of the phases above, compare the queues (in-process, NSQ, Postgres, NATS, Redis): latency and notify throughput, one table")
	flag.StringVar(&cfg.queue, "queue", "", "servers: the queue to build with -queues (memory | nsq | postgres | nats | redis); empty: the embedded nsqd of -nsqd")
	flag.StringVar(&cfg.queuePrefix, "queue-prefix", "", "servers: topic, subject, channel prefix (or Postgres channel) of -queue, unique per run")
	flag.StringVar(&cfg.pgDSN, "pg", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable", "-queues: PostgreSQL connection string")
	flag.StringVar(&cfg.natsURL, "nats", "nats://127.0.0.1:4222", "-queues: NATS server URL")
	flag.StringVar(&cfg.redisAddr, "redis", "127.0.0.1:6379", "-queues: Redis address")
	flag.IntVar(&cfg.qClients, "queue-clients", 200, "-queues: clients on the key of the latency run, all on the server that does not publish")
	flag.IntVar(&cfg.qRate, "queue-rate", 100, "-queues: changes per second of the latency run")
	flag.DurationVar(&cfg.qFor, "queue-for", 2500*time.Millisecond, "-queues: duration of the latency run")
	flag.IntVar(&cfg.qWriters, "queue-writers", 16, "-queues: goroutines calling NotifyAllOfChange in the throughput run")
	flag.DurationVar(&cfg.qTputFor, "queue-tput-for", time.Second, "-queues: duration of the throughput run")
	flag.BoolVar(&cfg.collections, "collections", false, "instead of the phases above, measure a collection: bytes per change with one row changed (diff vs full state), and clients reconnecting with and without resume (servers: serve the collection, server 1 with DisableDiffs)")
	flag.IntVar(&cfg.collRows, "coll-rows", 500, "-collections: rows in the collection")
	flag.IntVar(&cfg.collClients, "coll-clients", 50, "-collections: clients on each server in the bytes-per-change run")
	flag.IntVar(&cfg.collChanges, "coll-changes", 20, "-collections: changes in the bytes-per-change run")
	flag.IntVar(&cfg.collReconnect, "coll-reconnect", 1000, "-collections: clients that reconnect at once")
	flag.BoolVar(&cfg.cluster, "cluster", false, "instead of the phases above, grow a cluster of server processes on each queue and measure what each server pays per change (clients: serve the cluster's /csubscribe and /cwait)")
	flag.StringVar(&cfg.clusterN, "cluster-n", "2,4,8,16", "-cluster: growing server counts measured on each queue")
	flag.StringVar(&cfg.clusterQueues, "cluster-queues", "nsq,nats,nats-routed,redis,redis-routed,postgres", "-cluster: queues, in order (nsq | nats | redis | postgres; nats-routed, redis-routed: routing by key)")
	flag.IntVar(&cfg.clusterKeys, "cluster-keys", 10000, "-cluster: keys (Zipf ranks)")
	flag.Float64Var(&cfg.clusterZipf, "cluster-zipf", 1.0, "-cluster: Zipf exponent of subscriptions and changes")
	flag.IntVar(&cfg.clusterClients, "cluster-clients", 20, "-cluster: clients per server")
	flag.IntVar(&cfg.clusterSubs, "cluster-subs", 5, "-cluster: distinct keys each client watches")
	flag.IntVar(&cfg.clusterRate, "cluster-rate", 150, "-cluster: changes per second")
	flag.DurationVar(&cfg.clusterFor, "cluster-for", 2*time.Second, "-cluster: measured changes per size last this long")
	flag.DurationVar(&cfg.clusterIdle, "cluster-idle", 500*time.Millisecond, "-cluster: before each size's changes, how long the servers' idle CPU is measured (subtracted from their CPU per change)")
	flag.DurationVar(&cfg.clusterBurst, "cluster-burst", time.Second, "-cluster: per queue, how long the writer notifies as fast as it can to measure a server's receive cost (0: skip)")
	flag.BoolVar(&cfg.routeByKey, "route-by-key", false, "servers, cserver: with -queue nats or redis, route each key's notifications to the servers that watch it (RouteByKey of natsq.Config, redisq.Config) instead of broadcasting")
	flag.StringVar(&cfg.clusterStore, "cluster-store", "", "cserver: the mapped file of key versions (made by the orchestrator)")
	flag.Parse()

	if err := childproc.RaiseNOFILE(); err != nil {
		fmt.Fprintf(os.Stderr, "bench (%s): %v\n", cfg.role, err)
	}
	switch cfg.role {
	case "orchestrator":
		if cfg.queues {
			os.Exit(runQueues(cfg))
		}
		if cfg.collections {
			os.Exit(runCollections(cfg))
		}
		if cfg.cluster {
			os.Exit(runCluster(cfg))
		}
		os.Exit(runOrchestrator(cfg))
	case "servers":
		os.Exit(runServers(cfg))
	case "clients":
		os.Exit(runClients(cfg))
	case "cserver":
		os.Exit(runClusterServer(cfg))
	default:
		fmt.Fprintf(os.Stderr, "bench: unknown -role %q\n", cfg.role)
		os.Exit(2)
	}
}

type config struct {
	role, nsqd, servers, profile       string
	fanout, rate, burst, idle, changes int
	lowRate                            int
	rateFor, budget                    time.Duration
	verbose, rateAsync                 bool

	// The queue comparison (-queues).
	queues                    bool
	queue, queuePrefix        string
	pgDSN, natsURL, redisAddr string
	qClients, qRate, qWriters int
	qFor, qTputFor            time.Duration

	// The collection comparison (-collections).
	collections                                       bool
	collRows, collClients, collChanges, collReconnect int

	// The cluster benchmark (-cluster).
	cluster, routeByKey                                   bool
	clusterN, clusterQueues, clusterStore                 string
	clusterKeys, clusterClients, clusterSubs, clusterRate int
	clusterZipf                                           float64
	clusterFor, clusterIdle, clusterBurst                 time.Duration
}

func nofile() uint64 {
	var lim syscall.Rlimit
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	return lim.Cur
}

// procStats describes the process a control endpoint runs in.
type procStats struct {
	CPUNanos   int64  `json:"cpu_ns"` // user + system time since start
	HeapInuse  uint64 `json:"heap_inuse"`
	StackInuse uint64 `json:"stack_inuse"`
	Sys        uint64 `json:"sys"`
	Goroutines int    `json:"goroutines"`
	NOFILE     uint64 `json:"nofile"`
}

func (p procStats) mem() int64 { return int64(p.HeapInuse + p.StackInuse) }

// readProc reads the process's counters; with gc, after two collections so
// HeapInuse is close to the live heap.
func readProc(gc bool) procStats {
	if gc {
		runtime.GC()
		runtime.GC()
		debug.FreeOSMemory()
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return procStats{
		CPUNanos:   childproc.CPUNanos(),
		HeapInuse:  ms.HeapInuse,
		StackInuse: ms.StackInuse,
		Sys:        ms.Sys,
		Goroutines: runtime.NumGoroutine(),
		NOFILE:     nofile(),
	}
}

// writeJSON answers an HTTP control request.
func writeJSON(w interface {
	Write([]byte) (int, error)
}, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		b = []byte(`{"error":` + strconv.Quote(err.Error()) + `}`)
	}
	_, _ = w.Write(append(b, '\n'))
}

// appendRow renders the fetch function's row for a key:
// {"entity":"bench","id":"hot","v":12,"t":1700000000000000000}.
func appendRow(b []byte, id string, v, t int64) []byte {
	b = append(b, `{"entity":"`+entity+`","id":`...)
	b = strconv.AppendQuote(b, id)
	b = append(b, `,"v":`...)
	b = strconv.AppendInt(b, v, 10)
	b = append(b, `,"t":`...)
	b = strconv.AppendInt(b, t, 10)
	return append(b, '}')
}
