package main

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/gorilla/mux"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"

	esjs "github.com/entity-sync/entity-sync/clients/js"
	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/esmetrics"
	"github.com/entity-sync/entity-sync/esq/pgq"
	"github.com/entity-sync/entity-sync/shared"
)

// entityList is the entity type of a list's items: the key
// {"entity":"list","id":ID} has one row per item of list ID.
const entityList shared.EntityType = "list"

// The home page's key, {"entity":"lists","id":"recent"}: one row per list,
// the newest first. It is the only key of its entity type.
const (
	entityLists shared.EntityType = "lists"
	listsRecent                   = "recent"
)

// shutdownTimeout bounds a graceful shutdown, so a stuck client cannot keep
// the process alive after Ctrl-C.
const shutdownTimeout = 10 * time.Second

// indexHTML is the whole front end: the home page (lists) and a list's page.
//
//go:embed index.html
var indexHTML []byte

// serverConfig is what one todo server needs.
type serverConfig struct {
	// DB is the store, shared by every server of the demo.
	DB *store
	// NSQD is the nsqd TCP address the servers exchange notifications
	// through. Empty: Postgres LISTEN/NOTIFY when DB is Postgres, else the
	// in-process queue (fine for one server, useless for two).
	NSQD string
	// Log receives the server's and the library's log lines.
	Log *logrus.Logger
	// Ready, if set, is called with the page's URL once the server serves.
	Ready func(url string)
}

// serve runs one todo server on ln until ctx ends, then shuts down
// gracefully (websocket clients get close code 1001 and reconnect to another
// server). It owns ln.
func serve(ctx context.Context, cfg serverConfig, ln net.Listener) error {
	log := cfg.Log.WithField("addr", ln.Addr().String())
	esCfg := entitysync.Config{Mux: mux.NewRouter(), NSQAddr: cfg.NSQD, Logger: log}
	queue := queueName(cfg)
	if cfg.DB.pg == nil && cfg.NSQD == "" {
		// Nothing reaches the other servers: a page on another server sees
		// this one's writes only after a reload. Say so before anyone wonders.
		log.Warn("the in-process queue does not sync servers: this server's writes reach only its own pages, " +
			"and another server's writes do not reach them. Run every server with -nsqd HOST:PORT (one nsqd for all) " +
			"or with -pg, or run the launcher (the todo command without -serve), which does it for you")
	}
	if cfg.DB.pg != nil {
		q, err := pgq.New(ctx, pgq.Config{Pool: cfg.DB.pg, Logger: log})
		if err != nil {
			ln.Close()
			return fmt.Errorf("postgres queue: %w", err)
		}
		esCfg.Queue = q // es.Close closes it
	}
	metrics := esmetrics.Instrument(&esCfg) // before New: it times the fetch rounds
	es, err := entitysync.New(esCfg)
	if err != nil {
		ln.Close()
		return fmt.Errorf("set up entity-sync: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if err := metrics.Register(reg, es); err != nil {
		ln.Close()
		return errors.Join(fmt.Errorf("register metrics: %w", err), es.Close(context.Background()))
	}

	// How entity-sync reads a list: once per change on each server that has
	// subscribers for it, whatever their number. One JSON row per item; no
	// rows (an empty or unknown list) reaches the page as "gone". A list is
	// a collection whose rows are named by the item's "id" (a number, which
	// JSONField takes as its JSON text): after the first full state a page
	// receives only the items added, changed or removed, and a page that
	// reconnects resumes from the state it holds.
	err = es.RegisterCollection(entityList, func(ctx context.Context, key shared.EntityKey) ([][]byte, error) {
		items, err := cfg.DB.items(ctx, key.ID)
		if err != nil {
			return nil, err
		}
		rows := make([][]byte, len(items))
		for i, it := range items {
			if rows[i], err = json.Marshal(it); err != nil {
				return nil, err
			}
		}
		return rows, nil
	}, esdb.JSONField("id"))
	if err != nil {
		ln.Close()
		return errors.Join(fmt.Errorf("register %q: %w", entityList, err), es.Close(context.Background()))
	}

	// The home page's lists, a collection too, its rows named by the list's
	// id (a string). Any id but "recent" has no rows.
	err = es.RegisterCollection(entityLists, func(ctx context.Context, key shared.EntityKey) ([][]byte, error) {
		if key.ID != listsRecent {
			return nil, nil
		}
		ls, err := cfg.DB.lists(ctx)
		if err != nil {
			return nil, err
		}
		rows := make([][]byte, len(ls))
		for i, l := range ls {
			if rows[i], err = json.Marshal(l); err != nil {
				return nil, err
			}
		}
		return rows, nil
	}, esdb.JSONField("id"))
	if err != nil {
		ln.Close()
		return errors.Join(fmt.Errorf("register %q: %w", entityLists, err), es.Close(context.Background()))
	}

	r := es.Mux // already serves the websocket endpoint, /ws/entity-sync/
	(&api{db: cfg.DB, es: es, log: log}).routes(r)
	page := func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-cache")
		_, _ = w.Write(indexHTML)
	}
	r.HandleFunc("/", page).Methods(http.MethodGet)
	r.HandleFunc("/lists/{list}", page).Methods(http.MethodGet)
	r.Handle("/entity-sync.js", esjs.Handler()).Methods(http.MethodGet) // the JavaScript client
	// The operator's endpoints (docs/operations.md): Prometheus metrics, and
	// the probes a load balancer or orchestrator asks. A real deployment
	// serves them where only those reach.
	r.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	r.Handle("/healthz", es.LivenessHandler())
	r.Handle("/readyz", es.ReadinessHandler())

	srv := &http.Server{Handler: r, ReadHeaderTimeout: 10 * time.Second}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	url := pageURL(ln.Addr())
	log.WithField("page", url).WithField("store", cfg.DB.where).WithField("queue", queue).Info("serving")
	if cfg.Ready != nil {
		cfg.Ready(url)
	}

	var failed error
	select {
	case <-ctx.Done():
	case failed = <-serveErr: // a listener failure: still clean up
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
	defer cancel()
	// Shutdown waits for HTTP requests; the websockets are es.Close's.
	if err := errors.Join(srv.Shutdown(shutdownCtx), es.Close(shutdownCtx)); err != nil {
		failed = errors.Join(failed, fmt.Errorf("shutdown: %w", err))
	}
	return failed
}

// queueName says which queue carries the server's notifications to the
// other servers, for its log.
func queueName(cfg serverConfig) string {
	switch {
	case cfg.DB.pg != nil:
		return "Postgres LISTEN/NOTIFY"
	case cfg.NSQD != "":
		return "NSQ (nsqd " + cfg.NSQD + ")"
	default:
		return "in-process (this server only)"
	}
}

// pageURL is the URL to open for a listener's address; a server listening on
// every interface is reached at localhost.
func pageURL(addr net.Addr) string {
	host, port, _ := net.SplitHostPort(addr.String())
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "localhost"
	}
	return "http://" + net.JoinHostPort(host, port) + "/"
}
