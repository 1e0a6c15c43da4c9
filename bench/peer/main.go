//go:build linux

// Command peer measures entity-sync side by side with Centrifuge v0.40.1,
// in one run on one machine, everything on 127.0.0.1. `make bench` runs it
// after the main benchmark; `make bench-peer` runs it alone. It prints
// markdown tables and exits by itself. entity-sync is measured twice, as
// two systems: "seed", used exactly as the seed's README does (es.Setup on
// a gorilla/mux router, RegisterEntityAndDBHandler with the secret-taking
// handler, the raw dialect), and "api", its current API (entitysync.New,
// Register, the envelope dialect its client libraries speak); "cf" is
// Centrifuge. Every change of every system comes through the app's HTTP
// write endpoint (NotifyAllOfChange, or Publish, from the handler).
//
// Phases (-phases; all but the floor by default):
//
//   - peer: one key, 20, 200 and 1,000 clients, one server and two;
//   - floor (not run by default): plain loopback TCP writes of the same
//     frame, the limit;
//   - breakdown: the seed path's latency at a low rate split into stages
//     (notify, queue, fetch, fan-out, socket, client);
//   - manykeys: 10,000 keys with 1-5 subscribers each over 1,000
//     connections, 2,000 changes/s over the keys (Zipf and uniform): the
//     cost of a change when the fan-out is small.
//
// It lives in its own Go module so that Centrifuge and its dependencies
// (Redis client, Prometheus, protobuf) never reach the library's go.mod. It
// uses only entity-sync's public API (entitysync.Setup/New,
// RegisterEntityAndDBHandler/Register, NotifyAllOfChange, Mux, Close, and
// esbridge.Options.OnRound through entitysync.Config.Bridge), so it keeps
// working when the library's core changes underneath.
//
// Every server under test runs in its own OS process, so its CPU time
// (getrusage RUSAGE_SELF) and allocations are its own; the websocket
// clients run in one more process; the orchestrator (this process when run
// without -role) starts the nsqd and the others, drives the changes,
// and prints the tables. Roles:
//
//   - seed, api: one entity-sync server (in-process queue, or -nsqd;
//     -stamp adds the breakdown's instruments);
//   - cf: one Centrifuge node (memory broker, or -redis-addr);
//   - api-redis: api with redisq (routed by key) on -redis-addr;
//   - floor: a plain TCP server writing one pre-encoded frame per change to
//     every connection;
//   - clients: the websocket (and floor TCP) clients;
//   - nsqd: the nsqd entity-sync's two-server rows publish through.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
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
	redisAddr string // cf, api-redis: use the Redis at this address
	prefix    string // cf, api-redis: Redis key prefix, unique per run
	cell      string // es, cf: path of the shared version cell
	stamp     bool   // es: record rounds and socket writes (the breakdown phase)

	// orchestrator: the breakdown phase's row ("" skips it)
	breakdown string

	// orchestrator: what to run, and profiles
	systems      string
	phases       string
	manyKeysOnly bool
	profile      string
	many         manyConfig
}

func main() {
	var cfg config
	flag.StringVar(&cfg.role, "role", "orchestrator", "orchestrator | seed | api | cf | floor | clients | nsqd (all but the first are started by the orchestrator)")
	flag.BoolVar(&cfg.verbose, "v", false, "let the children log more")
	flag.StringVar(&cfg.rows, "rows", defaultRows, "rows as clients:changes/s:changes, comma-separated")
	flag.DurationVar(&cfg.budget, "budget", 300*time.Second, "time budget for the whole run: a row still running when it ends fails, and says so")
	flag.StringVar(&cfg.redis, "redis", "127.0.0.1:6379", "Redis for Centrifuge's two-server half (skipped, and said so, when nothing answers there)")
	flag.BoolVar(&cfg.skipTwo, "one-server-only", false, "skip the two-server half for both systems")
	flag.StringVar(&cfg.systems, "systems", "seed,api,cf,api-redis", "systems to measure, comma-separated: seed (entity-sync as the seed README uses it), api (entitysync.New + Register, envelope dialect), cf (Centrifuge), api-redis (api with two servers over Redis, redisq routed by key)")
	flag.StringVar(&cfg.phases, "phases", strings.Join(defaultPhases, ","), "phases to run, comma-separated: "+strings.Join(allPhases, ", "))
	flag.BoolVar(&cfg.manyKeysOnly, "many-keys-only", false, "run the many-keys phase only (-phases manykeys)")
	flag.StringVar(&cfg.profile, "profile", "", "directory to write CPU and allocation profiles of the entity-sync servers to, one per measured window and process (GODEBUG=memprofilerate=1 records every allocation)")
	cfg.many.flags()
	flag.StringVar(&cfg.nsqd, "nsqd", "", "seed, api roles: nsqd TCP address (none: in-process queue)")
	flag.StringVar(&cfg.redisAddr, "redis-addr", "", "cf role: Redis address (none: memory broker); api-redis role: the Redis redisq uses")
	flag.StringVar(&cfg.prefix, "prefix", "", "cf, api-redis roles: Redis key prefix")
	flag.StringVar(&cfg.cell, "cell", "", "seed, api, cf roles: shared version cell file")
	flag.BoolVar(&cfg.stamp, "stamp", false, "seed, api roles: record fetch rounds (OnRound) and socket write times for the breakdown phase")
	flag.StringVar(&cfg.breakdown, "breakdown", defaultBreakdown, "the latency breakdown's row, clients:changes/s:changes, for entity-sync's seed path with one server and with two through nsqd (\"\": skip)")
	flag.Parse()

	if err := childproc.RaiseNOFILE(); err != nil {
		fmt.Fprintf(os.Stderr, "peer (%s): %v\n", cfg.role, err)
	}
	var code int
	switch cfg.role {
	case "orchestrator":
		code = runOrchestrator(cfg)
	case "seed", "api", "api-redis":
		code = runES(cfg)
	case "cf":
		code = runCF(cfg)
	case "floor":
		code = runFloor(cfg)
	case "clients":
		code = runClients(cfg)
	case "nsqd":
		code = runNSQD(cfg)
	default:
		fmt.Fprintf(os.Stderr, "peer: unknown -role %q\n", cfg.role)
		code = 2
	}
	os.Exit(code)
}
