//go:build linux

// Command soak runs entity-sync for minutes as a small cluster of separate
// processes on 127.0.0.1, injects faults at random times and checks at the
// end that nothing was lost. Run it with `make soak` (3 minutes) or
// `go run ./soak -duration 60s -bin ./bin`; it prints one markdown table and
// exits non-zero when any check fails.
//
// One binary plays three roles, chosen by -role:
//
//   - orchestrator (the default) holds the store (the servers' shared
//     "database", over HTTP), starts nsqlookupd, two nsqd (the binaries
//     `make nsq` builds), three soak servers and one clients process as
//     child processes, runs the writers and the fault schedule, then checks
//     and prints the table;
//   - server is a small application on the library: entitysync.New on the
//     two nsqd and nsqlookupd, one entity type whose fetch function reads the
//     store, an HTTP endpoint to write a row (bump its version in the store,
//     then NotifyAllOfChange) and one to report its process and bridge
//     stats;
//   - clients runs the esclient clients, each subscribed to a random set of
//     keys that changes over time, recording every row it receives, and the
//     misbehaving clients the orchestrator asks for.
//
// Every row is {"id":"k17","v":42}: the key's version in the store when the
// server fetched it. A client checks that, per key and connection, versions
// never go down (docs/protocol.md: seq is per connection, so after a
// reconnect, possibly to another server, expectations start afresh), and at
// the end the orchestrator compares every client's last row of every key it
// subscribes to with the store.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/entity-sync/entity-sync/internal/childproc"
)

// entity is the soak's one entity type.
const entity = "soak"

// childLifetime bounds a child process's life even if the orchestrator
// never stops it (it also dies with the orchestrator: Pdeathsig).
const childLifetime = 30 * time.Minute

func main() {
	var cfg config
	flag.StringVar(&cfg.role, "role", "orchestrator", "orchestrator | server | clients (the last two are started by the orchestrator)")
	flag.DurationVar(&cfg.duration, "duration", 3*time.Minute, "how long writers write and faults are injected (the quiet period and checks come after)")
	flag.Int64Var(&cfg.seed, "seed", 0, "seed of every random choice the orchestrator makes (fault times, targets, keys); 0: from the clock (printed, to repeat a run)")
	flag.StringVar(&cfg.bin, "bin", "bin", "directory holding nsqd and nsqlookupd (make nsq)")
	flag.IntVar(&cfg.servers, "servers", 3, "soak servers")
	flag.IntVar(&cfg.clients, "clients", 500, "esclient clients")
	flag.IntVar(&cfg.keys, "keys", 200, "keys")
	flag.IntVar(&cfg.perClient, "keys-per-client", 10, "keys each client subscribes to at a time")
	flag.IntVar(&cfg.rate, "rate", 100, "writes per second, spread over the writers")
	flag.IntVar(&cfg.churn, "churn", 20, "subscription changes per second (one unsubscribe and one subscribe each)")
	flag.DurationVar(&cfg.quiet, "quiet", 60*time.Second, "after the last write, how long clients get to converge before the check fails")
	flag.StringVar(&cfg.logDir, "logs", "", "directory for the children's logs (default: a temporary directory, removed when every check passed)")
	flag.StringVar(&cfg.faults, "faults", "all", "comma-separated fault kinds to inject (server-kill, nsqd-kill, server-stop, lookupd-down, client-stuck, client-flood, client-churn), all, or none")
	flag.BoolVar(&cfg.verbose, "v", false, "log more: the orchestrator prints each fault as it happens")
	// Set by the orchestrator for its children.
	flag.StringVar(&cfg.listen, "listen", "", "server: address to listen on")
	flag.StringVar(&cfg.nsqd, "nsqd", "", "server: comma-separated nsqd TCP addresses, the one to publish to first")
	flag.StringVar(&cfg.lookupd, "lookupd", "", "server: nsqlookupd HTTP address")
	flag.StringVar(&cfg.store, "store", "", "server: the store's base URL")
	flag.StringVar(&cfg.serverURLs, "server-urls", "", "clients: comma-separated server base URLs (http://host:port)")
	flag.Parse()

	if err := childproc.RaiseNOFILE(); err != nil {
		fmt.Fprintf(os.Stderr, "soak (%s): %v\n", cfg.role, err)
	}
	switch cfg.role {
	case "orchestrator":
		os.Exit(runOrchestrator(cfg))
	case "server":
		os.Exit(runServer(cfg))
	case "clients":
		os.Exit(runClients(cfg))
	default:
		fmt.Fprintf(os.Stderr, "soak: unknown -role %q\n", cfg.role)
		os.Exit(2)
	}
}

type config struct {
	role                   string
	duration, quiet        time.Duration
	seed                   int64
	bin, logDir, faults    string
	servers, clients, keys int
	perClient, rate, churn int
	verbose                bool
	listen, nsqd, lookupd  string
	store, serverURLs      string
}

// rssBytes reads the process's resident set size from /proc/self/statm.
func rssBytes() int64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return -1
	}
	var size, resident int64
	if _, err := fmt.Sscan(string(b), &size, &resident); err != nil {
		return -1
	}
	return resident * int64(os.Getpagesize())
}

// writeJSON answers an HTTP request with v as JSON.
func writeJSON(w interface{ Write([]byte) (int, error) }, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		b = []byte(`{"error":` + strconv.Quote(err.Error()) + `}`)
	}
	_, _ = w.Write(append(b, '\n'))
}

// row is the fetch function's one row for a key.
type row struct {
	ID string `json:"id"`
	V  int64  `json:"v"`
}

// keyID names key number i.
func keyID(i int) string { return "k" + strconv.Itoa(i) }
