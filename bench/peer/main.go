//go:build linux

// Command peer measures entity-sync side by side with Centrifuge v0.40.1
// (the peer phase) and against plain loopback TCP writes (the floor phase),
// in one run on one machine, everything on 127.0.0.1. `make bench` runs it
// after the main benchmark; `make bench-peer` runs it alone. It prints
// markdown tables and exits by itself.
//
// A third phase, the breakdown, splits entity-sync's latency at a low rate
// into its stages (notify, queue, fetch, fan-out, socket, client), with one
// server and with two through nsqd.
//
// It lives in its own Go module so that Centrifuge and its dependencies
// (Redis client, Prometheus, protobuf) never reach the library's go.mod. It
// uses only entity-sync's public API (entitysync.New, Register,
// NotifyAllOfChange, Mux, Close, and esbridge.Options.OnRound through
// entitysync.Config.Bridge), so it keeps working when the library's core
// changes underneath.
//
// Every server under test runs in its own OS process, so its CPU time
// (getrusage RUSAGE_SELF) is its own; the websocket clients run in one more
// process; the orchestrator (this process when run without -role) embeds
// the nsqd, starts the others, drives the rows and prints the tables. Roles:
//
//   - es: one entity-sync server (in-process queue, or -nsqd; -stamp adds
//     the breakdown's instruments);
//   - cf: one Centrifuge node (memory broker, or -redis);
//   - floor: a plain TCP server writing one pre-encoded frame per change to
//     every connection;
//   - clients: the websocket (and floor TCP) clients.
package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/entity-sync/entity-sync/internal/childproc"
)

// config holds every flag; each role reads the ones it needs.
type config struct {
	role    string
	verbose bool

	// orchestrator
	rows    string
	budget  time.Duration
	redis   string
	skipTwo bool

	// servers
	nsqd      string // es: consume and publish through this nsqd
	redisAddr string // cf: use the Redis broker at this address
	prefix    string // cf: Redis key prefix, unique per run
	cell      string // es, cf: path of the shared version cell
	stamp     bool   // es: record rounds and socket writes (the breakdown phase)

	// orchestrator: the breakdown phase's row ("" skips it)
	breakdown string
}

func main() {
	var cfg config
	flag.StringVar(&cfg.role, "role", "orchestrator", "orchestrator | es | cf | floor | clients (all but the first are started by the orchestrator)")
	flag.BoolVar(&cfg.verbose, "v", false, "let the children log more")
	flag.StringVar(&cfg.rows, "rows", defaultRows, "rows as clients:changes/s:changes, comma-separated")
	flag.DurationVar(&cfg.budget, "budget", 240*time.Second, "time budget for the whole run: a row still running when it ends fails, and says so")
	flag.StringVar(&cfg.redis, "redis", "127.0.0.1:6379", "Redis for Centrifuge's two-server half (skipped, and said so, when nothing answers there)")
	flag.BoolVar(&cfg.skipTwo, "one-server-only", false, "skip the two-server half for both systems")
	flag.StringVar(&cfg.nsqd, "nsqd", "", "es role: nsqd TCP address (none: in-process queue)")
	flag.StringVar(&cfg.redisAddr, "redis-addr", "", "cf role: Redis address (none: memory broker)")
	flag.StringVar(&cfg.prefix, "prefix", "", "cf role: Redis key prefix")
	flag.StringVar(&cfg.cell, "cell", "", "es, cf roles: shared version cell file")
	flag.BoolVar(&cfg.stamp, "stamp", false, "es role: record fetch rounds (OnRound) and socket write times for the breakdown phase")
	flag.StringVar(&cfg.breakdown, "breakdown", defaultBreakdown, "the latency breakdown's row, clients:changes/s:changes, for entity-sync with one server and with two through nsqd (\"\": skip)")
	flag.Parse()

	if err := childproc.RaiseNOFILE(); err != nil {
		fmt.Fprintf(os.Stderr, "peer (%s): %v\n", cfg.role, err)
	}
	var code int
	switch cfg.role {
	case "orchestrator":
		code = runOrchestrator(cfg)
	case "es":
		code = runES(cfg)
	case "cf":
		code = runCF(cfg)
	case "floor":
		code = runFloor(cfg)
	case "clients":
		code = runClients(cfg)
	default:
		fmt.Fprintf(os.Stderr, "peer: unknown -role %q\n", cfg.role)
		code = 2
	}
	os.Exit(code)
}
