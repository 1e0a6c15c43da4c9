// Command todo is entity-sync's demo app: shared todo lists that change live
// in every browser showing them, whichever server each browser talks to.
//
//	go run ./examples/todo
//
// starts two servers, on 127.0.0.1:8080 and 127.0.0.1:8081, as two processes
// sharing one SQLite database (a file under -data) and an NSQ broker between
// them (nsqd, embedded in the launching process), and prints their URLs.
// Open one in each of two windows, create a list in one and open it in the
// other (the home page lists it): add, edit, tick or delete an item on
// either side and the other shows it at once. A server that dies is started
// again (the launcher says so); the other serves on meanwhile, and the dead
// one's pages reconnect once it is back. Ctrl-C stops everything.
// Each server also serves Prometheus metrics on /metrics, and liveness and
// readiness probes on /healthz and /readyz (docs/operations.md).
//
// The home page is live too: a list created on either side appears on the
// other's home page at once.
//
// With PostgreSQL as both the database and the queue between the servers
// (LISTEN/NOTIFY; triggers on the items and lists tables notify every
// write, even one made with psql, such as renaming a list):
//
//	go run ./examples/todo -pg postgres://postgres@127.0.0.1:5432/test
//
// One server alone, say one of several behind a load balancer:
//
//	go run ./examples/todo -serve -listen 127.0.0.1:8080 -nsqd 127.0.0.1:4150 -data /var/lib/todo
//
// The files, in reading order: server.go (entity-sync's setup and the fetch
// function), api.go (the HTTP API the page writes through, and the
// notification after each write), store.go (the SQL), index.html (the page
// and its subscription), launcher.go (the two processes).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/sirupsen/logrus"
)

// options are the command's flags.
type options struct {
	listen   []string // HTTP addresses, one per server
	data     string   // SQLite's directory
	pg       string   // PostgreSQL connection string; empty: SQLite
	serve    bool     // run one server rather than the launcher
	nsqd     string   // with serve: nsqd TCP address
	launched bool     // with serve: started by the launcher
	debug    bool
}

func main() {
	var o options
	listen := flag.String("listen", "127.0.0.1:8080,127.0.0.1:8081", "HTTP addresses, comma-separated: one server on each (with -serve: one address)")
	flag.StringVar(&o.data, "data", filepath.Join(os.TempDir(), "entity-sync-todo"), "directory of the SQLite database (todo.db)")
	flag.StringVar(&o.pg, "pg", "", "PostgreSQL connection string: store the lists there, and use LISTEN/NOTIFY as the queue")
	flag.BoolVar(&o.serve, "serve", false, "run one server (on the -listen address) instead of launching several")
	flag.StringVar(&o.nsqd, "nsqd", "", "with -serve: nsqd TCP address the servers exchange notifications through; without it (or -pg) the server syncs with no other and says so")
	flag.BoolVar(&o.launched, "launched", false, "with -serve: started by the launcher (prints the URL on stdout when ready, stops when stdin closes)")
	flag.BoolVar(&o.debug, "debug", false, "log at debug level")
	flag.Parse()
	for _, a := range strings.Split(*listen, ",") {
		if a = strings.TrimSpace(a); a != "" {
			o.listen = append(o.listen, a)
		}
	}

	if len(o.listen) == 0 {
		fmt.Fprintln(os.Stderr, "todo: -listen names no address")
		os.Exit(2)
	}

	// Ctrl-C (SIGINT) or SIGTERM starts a graceful shutdown.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	var err error
	if o.serve {
		err = runServer(ctx, o)
	} else {
		err = launch(ctx, o)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "todo:", err)
		os.Exit(1)
	}
}

// runServer runs one server until ctx ends (or, when launched, until the
// launcher goes away).
func runServer(ctx context.Context, o options) error {
	if len(o.listen) != 1 {
		return fmt.Errorf("-serve runs one server: give one -listen address, not %q", o.listen)
	}
	log := logrus.StandardLogger()
	if o.debug {
		log.SetLevel(logrus.DebugLevel)
	}
	cfg := serverConfig{NSQD: o.nsqd, Log: log}
	if o.launched {
		// The launcher holds our stdin open for as long as it runs, so EOF
		// means it stopped us, or died: either way, stop (no orphans).
		var stop context.CancelFunc
		ctx, stop = context.WithCancel(ctx)
		defer stop()
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			stop()
		}()
		cfg.Ready = func(url string) { fmt.Println(url) }
	}

	var err error
	if o.pg != "" {
		cfg.DB, err = openPostgres(ctx, o.pg)
	} else {
		cfg.DB, err = openSQLite(o.data)
	}
	if err != nil {
		return err
	}
	defer cfg.DB.Close()
	ln, err := net.Listen("tcp", o.listen[0])
	if err != nil {
		return err
	}
	return serve(ctx, cfg, ln)
}
