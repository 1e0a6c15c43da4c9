// Command basic is the entity-sync demo: a server with one entity type,
// "items", whose item "100" changes every second. Connect a websocket client,
// subscribe to items/100, and watch each change arrive.
//
// Run it with nothing else installed (an in-process queue carries the change
// notifications):
//
//	go run ./examples/basic
//	go run ./examples/basic/client        # in another terminal
//
// or open http://127.0.0.1:8080/ in a browser: the page there subscribes
// with the JavaScript client (clients/js) and shows the item change live.
// The same address serves Prometheus metrics on /metrics, and liveness and
// readiness probes on /healthz and /readyz (docs/operations.md).
//
// Or run several instances on NSQ, sharing one item file as servers share a
// database: instance 8080 changes the item, and the clients of 8081 see it
// because the notification travels through NSQ (see `make cluster` and
// docker-compose.yml):
//
//	go run ./examples/basic -listen 127.0.0.1:8080 -nsqd 127.0.0.1:4150 -store /tmp/items.json
//	go run ./examples/basic -listen 127.0.0.1:8081 -nsqd 127.0.0.1:4150 -store /tmp/items.json -every 0
//	go run ./examples/basic/client -url ws://127.0.0.1:8081/ws/entity-sync/
//
// Any websocket client speaks the same protocol: send
//
//	{"action":"subscribe","body":{"entity":"items","id":"100"}}
//
// and each push is the item's JSON row as one text frame.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/mux"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esmetrics"
	"github.com/entity-sync/entity-sync/shared"
)

// entityItems is the one entity type the demo serves.
const entityItems shared.EntityType = "items"

// demoItemID is the item the demo keeps changing.
const demoItemID = "100"

// The operator's endpoints: Prometheus metrics, liveness and readiness
// probes (see docs/operations.md).
const (
	metricsPath   = "/metrics"
	livenessPath  = "/healthz"
	readinessPath = "/readyz"
)

// shutdownTimeout bounds a graceful shutdown, so a stuck client cannot keep
// the process alive after Ctrl-C.
const shutdownTimeout = 10 * time.Second

// config is everything run needs; main fills it from flags, tests directly.
type config struct {
	// NSQDAddrs are nsqd TCP addresses. With neither these nor LookupdAddrs,
	// the in-process queue is used: one server, nothing to install.
	NSQDAddrs []string
	// LookupdAddrs are nsqlookupd HTTP addresses; consumers find every nsqd
	// through them. NSQ still needs one nsqd in NSQDAddrs to publish to.
	LookupdAddrs []string
	// Every is how often item 100 changes; 0 turns the changer off (an
	// instance that only serves clients).
	Every time.Duration
	// Items is the data the app syncs. Nil means a fresh in-memory store
	// with item 100. Instances given the same store behave like servers
	// sharing a database.
	Items *itemStore
	// Log receives the demo's and the library's log lines. Nil means logrus's
	// standard logger.
	Log *logrus.Logger
}

func main() {
	var cfg config
	listen := flag.String("listen", "127.0.0.1:8080", "HTTP address to serve the websocket endpoint "+shared.WebsocketPath+" on")
	flag.Var((*addrList)(&cfg.NSQDAddrs), "nsqd", "nsqd TCP address (host:port); repeat or comma-separate for several. Default: in-process queue")
	flag.Var((*addrList)(&cfg.LookupdAddrs), "lookupd", "nsqlookupd HTTP address (host:port); repeat or comma-separate for several. Needs -nsqd too")
	flag.DurationVar(&cfg.Every, "every", time.Second, "how often item "+demoItemID+" changes (0 = never)")
	store := flag.String("store", "", "JSON file to keep items in, shared by the instances on one host (default: in memory)")
	debug := flag.Bool("debug", false, "log at debug level")
	flag.Parse()

	cfg.Log = logrus.StandardLogger()
	if *debug {
		cfg.Log.SetLevel(logrus.DebugLevel)
	}
	var err error
	if cfg.Items, err = openItemStore(*store); err != nil {
		cfg.Log.WithError(err).Fatal("open item store")
	}

	// Ctrl-C (SIGINT) and `docker stop` (SIGTERM) both cancel ctx, which
	// starts a graceful shutdown in run.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		cfg.Log.WithError(err).Fatal("listen")
	}
	if err := run(ctx, cfg, ln); err != nil {
		cfg.Log.WithError(err).Fatal("demo stopped with an error")
	}
	cfg.Log.Info("bye")
}

// run serves the demo on ln until ctx ends, then shuts down gracefully: no new
// connections, websocket clients get a close frame (1001 going away), and
// queue connections are released. It returns nil after a clean shutdown. run
// owns ln and closes it; taking a listener rather than an address lets tests
// use port 0 and know the address before anything connects.
func run(ctx context.Context, cfg config, ln net.Listener) error {
	if cfg.Log == nil {
		cfg.Log = logrus.StandardLogger()
	}
	if cfg.Items == nil {
		cfg.Items, _ = openItemStore("") // in memory: cannot fail
	}
	log := cfg.Log.WithField("addr", ln.Addr().String())

	// With no NSQ address, New picks the in-process queue.
	esCfg := entitysync.Config{
		Mux:             mux.NewRouter(),
		NSQDAddrs:       cfg.NSQDAddrs,
		NSQLookupdAddrs: cfg.LookupdAddrs,
		Logger:          cfg.Log,
	}
	// Metrics: Instrument before New (it hooks the fetch rounds), Register
	// after. The registry is the demo's own, with the Go runtime's and the
	// process's metrics beside entity-sync's.
	metrics := esmetrics.Instrument(&esCfg)
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
	// The operator's endpoints (docs/operations.md). A real deployment
	// would serve them on an address the load balancer and Prometheus
	// reach but the public does not.
	es.Mux.Handle(metricsPath, promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	es.Mux.Handle(livenessPath, es.LivenessHandler())
	es.Mux.Handle(readinessPath, es.ReadinessHandler())

	// The fetch function is how the library reads an entity: it is called once
	// per change on each server that has subscribers for the key, and its rows
	// go to all of them. One item, one JSON row; no rows means "gone".
	err = es.Register(entityItems, func(_ context.Context, key shared.EntityKey) ([][]byte, error) {
		it, ok, err := cfg.Items.get(key.ID)
		if err != nil || !ok {
			return nil, err
		}
		row, err := json.Marshal(it)
		if err != nil {
			return nil, err
		}
		return [][]byte{row}, nil
	})
	if err != nil {
		ln.Close()
		return errors.Join(fmt.Errorf("register %q: %w", entityItems, err), es.Close(context.Background()))
	}

	// The changer stands in for the app's writes: change the data first, then
	// tell every server (through the queue) that the key changed. Its own
	// context lets shutdown stop it even when the server fails on its own.
	changerCtx, stopChanger := context.WithCancel(ctx)
	defer stopChanger()
	var changer sync.WaitGroup
	if cfg.Every > 0 {
		changer.Go(func() { changeEvery(changerCtx, cfg.Every, cfg.Items, es, log) })
	}

	// The page at / shows item 100 live through the JavaScript client.
	addPage(es.Mux)

	srv := &http.Server{
		Handler:           es.Mux,
		ReadHeaderTimeout: 10 * time.Second, // websocket upgrades are plain HTTP requests until they succeed
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.WithField("endpoint", "ws://"+ln.Addr().String()+shared.WebsocketPath).
		WithField("page", "http://"+ln.Addr().String()+"/").
		WithField("metrics", "http://"+ln.Addr().String()+metricsPath).
		WithField("queue", queueName(cfg)).
		Info("serving; subscribe to items/" + demoItemID)

	var failed error
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case failed = <-serveErr:
		// Serve only returns early on a listener failure: still clean up.
		log.WithError(failed).Error("http server stopped; shutting down")
	}

	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
	defer cancel()
	// Stop the changer before closing the library, so no notify races Close.
	stopChanger()
	changer.Wait()
	// Shutdown stops accepting and waits for plain HTTP requests; upgraded
	// websockets are not its business, es.Close says goodbye to those.
	herr := srv.Shutdown(shutdownCtx)
	eerr := es.Close(shutdownCtx)
	if err := errors.Join(herr, eerr); err != nil {
		failed = errors.Join(failed, fmt.Errorf("shutdown: %w", err))
	}
	return failed
}

// changeEvery bumps item 100 every interval and notifies all servers, until
// ctx ends.
func changeEvery(ctx context.Context, every time.Duration, items *itemStore, es *entitysync.EntitySync, log logrus.FieldLogger) {
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	key := shared.EntityKey{Entity: entityItems, ID: demoItemID}
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		it, err := items.bump(demoItemID)
		if err != nil {
			log.WithError(err).Error("change failed")
			continue
		}
		// Only the key travels; each server fetches the data itself.
		if err := es.NotifyAllOfChange(key); err != nil {
			log.WithError(err).Warn("notify failed; subscribers catch up on the next change")
			continue
		}
		log.WithField("counter", it.Counter).Debug("item changed")
	}
}

func queueName(cfg config) string {
	if len(cfg.NSQDAddrs)+len(cfg.LookupdAddrs) == 0 {
		return "in-process"
	}
	return fmt.Sprintf("nsq nsqd=%v lookupd=%v", cfg.NSQDAddrs, cfg.LookupdAddrs)
}

// item is what the demo syncs: one JSON row per item.
type item struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Counter   int       `json:"counter"`
	UpdatedAt time.Time `json:"updated_at"`
}

// itemStore stands in for the app's database. It lives in memory, or, with a
// file path, in a JSON file that several instances on one host share the way
// real servers share a database: then a change one instance makes is what the
// others fetch when its notification reaches them.
type itemStore struct {
	mu    sync.Mutex
	path  string          // "" keeps items in memory only
	items map[string]item // the items; reloaded from path on every access
}

// openItemStore returns a store holding item 100, kept in the file at path,
// or in memory when path is "". An existing file is used as is.
func openItemStore(path string) (*itemStore, error) {
	s := &itemStore{path: path, items: map[string]item{
		demoItemID: {ID: demoItemID, Name: "demo counter", UpdatedAt: time.Now().UTC()},
	}}
	if path == "" {
		return s, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.load(); errors.Is(err, fs.ErrNotExist) {
		return s, s.save()
	} else if err != nil {
		return nil, err
	}
	return s, nil
}

func (s *itemStore) get(id string) (item, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.load(); err != nil {
		return item{}, false, err
	}
	it, ok := s.items[id]
	return it, ok, nil
}

// bump increments an item's counter, creating the item if needed.
func (s *itemStore) bump(id string) (item, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.load(); err != nil {
		return item{}, err
	}
	it := s.items[id]
	it.ID = id
	it.Counter++
	it.UpdatedAt = time.Now().UTC()
	s.items[id] = it
	return it, s.save()
}

// load rereads the file, if any, so writes by other instances are seen.
func (s *itemStore) load() error {
	if s.path == "" {
		return nil
	}
	b, err := os.ReadFile(s.path)
	if err != nil {
		return err
	}
	items := make(map[string]item)
	if err := json.Unmarshal(b, &items); err != nil {
		return fmt.Errorf("item store %s: %w", s.path, err)
	}
	s.items = items
	return nil
}

// save writes the file, if any, through a rename so that a reader in another
// process never sees half a file.
func (s *itemStore) save() error {
	if s.path == "" {
		return nil
	}
	b, err := json.Marshal(s.items)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(s.path), ".items-*.json")
	if err != nil {
		return err
	}
	_, err = tmp.Write(b)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), s.path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("item store %s: %w", s.path, err)
	}
	return nil
}

// addrList is a flag that may be repeated or comma-separated:
// -nsqd a:4150 -nsqd b:4150, or -nsqd a:4150,b:4150.
type addrList []string

func (a *addrList) String() string { return strings.Join(*a, ",") }

func (a *addrList) Set(v string) error {
	for _, addr := range strings.Split(v, ",") {
		addr = strings.TrimSpace(addr)
		if addr == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return fmt.Errorf("%q is not host:port: %w", addr, err)
		}
		*a = append(*a, addr)
	}
	return nil
}
