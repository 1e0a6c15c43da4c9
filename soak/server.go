//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/internal/childproc"
	"github.com/entity-sync/entity-sync/shared"
)

// serverStats is a server's /stats answer.
type serverStats struct {
	PID        int            `json:"pid"`
	Ready      bool           `json:"ready"` // the entity type is registered
	Goroutines int            `json:"goroutines"`
	RSS        int64          `json:"rss"` // bytes, from /proc/self/statm
	Bridge     esbridge.Stats `json:"bridge"`
}

// runServer is the server role: one entity-sync server on the library,
// whose fetch function reads the orchestrator's store. It exits when its
// stdin closes (after closing the library), or after childLifetime.
func runServer(cfg config) int {
	log := logrus.New()
	log.SetOutput(os.Stderr)
	log.SetLevel(logrus.WarnLevel)
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "soak server %s: "+format+"\n", append([]any{cfg.listen}, args...)...)
		return 1
	}

	l, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return fail("listen: %v", err)
	}
	storeClient := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	nsqds := strings.Split(cfg.nsqd, ",")
	// The queue is built here, as entitysync.New would from the same
	// addresses, to trace what it carries (see keyTrace).
	queue, err := esq.NewNSQ(esq.NSQConfig{NSQDAddrs: nsqds, LookupdHTTPAddrs: []string{cfg.lookupd}, Logger: log})
	if err != nil {
		return fail("esq.NewNSQ: %v", err)
	}
	trace := newKeyTrace()
	es, err := entitysync.New(entitysync.Config{
		Queue:  tracedQueue{queue, trace},
		Bridge: esbridge.Options{OnRound: trace.onRound},
		Logger: log,
	})
	if err != nil {
		return fail("entitysync.New: %v", err)
	}
	var ready atomic.Bool

	// fetch returns the key's latest version in the store, at fetch time.
	fetch := func(ctx context.Context, key shared.EntityKey) ([][]byte, error) {
		var r row
		if err := storeCall(ctx, storeClient, cfg.store+"/get?id="+key.ID, &r); err != nil {
			return nil, err
		}
		trace.add(key.ID, "fetched v%d", r.V)
		b, err := json.Marshal(r)
		return [][]byte{b}, err
	}

	mux := es.Mux
	// The websocket endpoint answers 503 until the entity type is served:
	// a client that subscribed earlier would be refused (unknown_entity)
	// and, per the protocol, not try again. Clients redial another server.
	mux.Use(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == shared.WebsocketPath && !ready.Load() {
				http.Error(w, "starting", http.StatusServiceUnavailable)
				return
			}
			next.ServeHTTP(w, r)
		})
	})
	mux.HandleFunc("/write", writeHandler(storeClient, cfg.store, cfg.listen, es.NotifyAllOfChange))
	mux.HandleFunc("/notify", func(w http.ResponseWriter, r *http.Request) {
		if err := es.NotifyAllOfChange(shared.EntityKey{Entity: entity, ID: r.URL.Query().Get("id")}); err != nil {
			http.Error(w, "notify: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		writeJSON(w, struct{}{})
	})
	mux.HandleFunc("/trace", trace.serveHTTP)
	mux.HandleFunc("/stats", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("gc") != "" {
			// Count what the server needs, not idle keep-alive connections
			// to the store (two goroutines each) or memory the runtime
			// keeps for later.
			storeClient.CloseIdleConnections()
			time.Sleep(100 * time.Millisecond)
			runtime.GC()
			debug.FreeOSMemory()
		}
		writeJSON(w, serverStats{
			PID:        os.Getpid(),
			Ready:      ready.Load(),
			Goroutines: runtime.NumGoroutine(),
			RSS:        rssBytes(),
			Bridge:     es.Bridge.Stats(),
		})
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }()

	// Register waits until the entity's topic is live on the brokers; while
	// nsqlookupd or an nsqd is down that can fail: an application retries.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		err := es.Register(entity, fetch)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fail("register: %v (giving up)", err)
		}
		log.WithError(err).Warn("soak server: register failed; retrying in 1s")
		time.Sleep(time.Second)
	}
	ready.Store(true)

	childproc.WaitForParent(childLifetime)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cerr := es.Close(ctx)
	_ = srv.Shutdown(ctx)
	if cerr != nil {
		return fail("close: %v", cerr)
	}
	return 0
}

// writeHandler serves /write: it bumps a key's version in the store, then
// notifies the change. Two rules every application calling
// NotifyAllOfChange must keep, which the soak's own first version broke:
//
//   - The write does not take the request's context. A client that gives
//     up (the orchestrator's 3 s timeout, while this server was SIGSTOPped)
//     must not cancel a write that may already have reached the store: the
//     store applied it, this server saw "context canceled" and skipped the
//     notification, and the other servers, which had fetched before the
//     write, kept the old version for good.
//   - A write whose outcome is unknown (an error after the request went
//     out) is notified anyway: a needless notification costs one fetch, a
//     missing one leaves clients stale.
func writeHandler(hc *http.Client, store, by string, notify func(shared.EntityKey) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id := r.URL.Query().Get("id")
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 10*time.Second)
		defer cancel()
		var out row
		werr := storeCall(ctx, hc, store+"/bump?id="+url.QueryEscape(id)+"&by="+url.QueryEscape(by), &out)
		nerr := notify(shared.EntityKey{Entity: entity, ID: id})
		switch {
		case werr != nil:
			http.Error(w, "store: "+werr.Error(), http.StatusBadGateway)
		case nerr != nil:
			http.Error(w, "notify: "+nerr.Error(), http.StatusServiceUnavailable)
		default:
			writeJSON(w, out)
		}
	}
}

// storeCall POSTs to the store and decodes its answer into out.
func storeCall(ctx context.Context, c *http.Client, u string, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("%s: %s: %s", u, resp.Status, strings.TrimSpace(string(b)))
	}
	return json.NewDecoder(resp.Body).Decode(out)
}
