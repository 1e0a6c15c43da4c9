//go:build linux

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof" // /debug/pprof/ on every server's listener, for -profile
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esweb"
	"github.com/entity-sync/entity-sync/internal/childproc"
	"github.com/entity-sync/entity-sync/shared"
)

// serverCount is how many entity-sync servers the servers process runs.
const serverCount = 2

// childLifetime bounds a child process's life even if the orchestrator
// never closes its stdin (it also dies with the orchestrator: Pdeathsig).
const childLifetime = 10 * time.Minute

// store is the servers' shared "database": per key, a version and the time
// of the notify that made it.
type store struct {
	mu   sync.Mutex
	rows map[string]version
}

type version struct{ v, t int64 }

func (s *store) bump(id string) version {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := version{v: s.rows[id].v + 1, t: time.Now().UnixNano()}
	s.rows[id] = r
	return r
}

func (s *store) get(id string) version {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rows[id]
}

func (s *store) fetch(_ context.Context, key shared.EntityKey) ([][]byte, error) {
	r := s.get(key.ID)
	return [][]byte{appendRow(make([]byte, 0, 96), key.ID, r.v, r.t)}, nil
}

// serversHello is the servers process's first stdout line.
type serversHello struct {
	WS  []string `json:"ws"`  // websocket URLs
	Ctl []string `json:"ctl"` // control base URLs
	Web string   `json:"web"` // transport settings, for the report
	Err string   `json:"err,omitempty"`
}

// serverStats is /ctl/stats's answer.
type serverStats struct {
	Server int            `json:"server"`
	Bridge esbridge.Stats `json:"bridge"`
	Conns  int            `json:"conns"`
	Proc   procStats      `json:"proc"`
}

// bumpResult is /ctl/bump's answer.
type bumpResult struct {
	N           int    `json:"n"`
	LastVersion int64  `json:"last_version"`
	FirstNotify int64  `json:"first_notify_ns"` // UnixNano of the first change (its notify is called right after)
	LastNotify  int64  `json:"last_notify_ns"`  // UnixNano of the last notify call to start
	Done        int64  `json:"done_ns"`         // UnixNano when every notify call had returned
	Errors      int    `json:"errors"`
	FirstError  string `json:"first_error,omitempty"`
	// How long the notify calls took: NotifyAllOfChange (publish to nsqd
	// and its ack), or with Async, NotifyAsync (queue the key).
	NotifyP50 int64 `json:"notify_p50_ns"`
	NotifyP99 int64 `json:"notify_p99_ns"`
	NotifyMax int64 `json:"notify_max_ns"`
	// With Async: what the bridge's background publisher did, from the
	// bridge's Stats before the first call and after FlushNotifications.
	Async        bool   `json:"async,omitempty"`
	Published    uint64 `json:"published"`     // Stats().Notifications delta
	NotifyErrors uint64 `json:"notify_errors"` // Stats().NotifyErrors delta
	Pending      int    `json:"pending"`       // Stats().Pending after the flush
	Flushed      int64  `json:"flushed_ns"`    // UnixNano when FlushNotifications returned
	FlushErr     string `json:"flush_error,omitempty"`
}

func runServers(cfg config) int {
	log := logrus.New()
	log.SetOutput(os.Stderr)
	log.SetLevel(logrus.WarnLevel)
	if cfg.verbose {
		log.SetLevel(logrus.InfoLevel)
	}
	hello := serversHello{}
	fail := func(err error) int {
		hello.Err = err.Error()
		_ = json.NewEncoder(os.Stdout).Encode(hello)
		return 1
	}
	if cfg.nsqd == "" && cfg.queue == "" {
		return fail(errors.New("servers: -nsqd or -queue is required"))
	}
	count := serverCount
	if cfg.queue == "memory" {
		count = 1 // an in-process queue connects no other server
	}

	db := &store{rows: make(map[string]version)}
	webOpts := esweb.Options{} // the library's defaults
	hello.Web = "esweb.Options defaults (raw seed protocol, 256 B read buffer; frames encoded once per update and written without a per-connection buffer)"
	type running struct {
		es   *entitysync.EntitySync
		http *http.Server
	}
	var all []running
	var coll *collStore
	if cfg.collections && cfg.collRows > 0 {
		coll = newCollStore(cfg.collRows)
		hello.Web += fmt.Sprintf("; collection %q of %d rows, server 1 with DisableDiffs", collEntity, cfg.collRows)
	}
	for i := range count {
		web := webOpts
		if coll != nil && i == 1 {
			web.DisableDiffs = true // the full-state side of the comparison
		}
		esCfg := entitysync.Config{NSQAddr: cfg.nsqd, Logger: log, Web: web}
		if cfg.queue != "" {
			q, err := newQueue(cfg, log)
			if err != nil {
				return fail(fmt.Errorf("server %d: %s queue: %w", i, cfg.queue, err))
			}
			esCfg = entitysync.Config{Queue: q, Logger: log, Web: web}
		}
		es, err := entitysync.New(esCfg)
		if err != nil {
			return fail(fmt.Errorf("server %d: %w", i, err))
		}
		if err := es.Register(entity, db.fetch); err != nil {
			return fail(fmt.Errorf("server %d: register: %w", i, err))
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return fail(fmt.Errorf("server %d: listen: %w", i, err))
		}
		addControl(i, es, db)
		if coll != nil {
			if err := coll.serve(es); err != nil {
				return fail(fmt.Errorf("server %d: %w", i, err))
			}
		}
		es.Mux.PathPrefix("/debug/pprof/").Handler(http.DefaultServeMux)
		srv := &http.Server{Handler: es.Mux, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.WithError(err).Error("serve")
			}
		}()
		all = append(all, running{es, srv})
		hello.WS = append(hello.WS, "ws://"+l.Addr().String()+shared.WebsocketPath)
		hello.Ctl = append(hello.Ctl, "http://"+l.Addr().String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(hello); err != nil {
		return 1
	}

	childproc.WaitForParent(childLifetime)

	// Clean shutdown, timed, so a slow Close shows up in the log.
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	code := 0
	for i, r := range all {
		if err := r.es.Close(ctx); err != nil {
			fmt.Fprintf(os.Stderr, "bench servers: close server %d: %v\n", i, err)
			code = 1
		}
		_ = r.http.Close()
	}
	fmt.Fprintf(os.Stderr, "bench servers: closed in %s\n", time.Since(start).Round(time.Millisecond))
	return code
}

func addControl(i int, es *entitysync.EntitySync, db *store) {
	es.Mux.HandleFunc("/ctl/stats", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, serverStats{
			Server: i,
			Bridge: es.Bridge.Stats(),
			Conns:  es.Web.Connections(),
			Proc:   readProc(r.URL.Query().Get("gc") == "1"),
		})
	})
	// /ctl/bump?id=hot&n=1000&rate=200 changes the key n times and notifies
	// after each change. With a rate, changes are made on schedule (rate per
	// second) and each notify runs in its own goroutine, so a slow notify
	// does not hold the next change back (an open-loop load, as independent
	// writers make). Without one, conc writers change and notify as fast as
	// they can. With async=1 the notify is NotifyAsync, and the answer waits
	// for FlushNotifications.
	es.Mux.HandleFunc("/ctl/bump", func(w http.ResponseWriter, r *http.Request) {
		qv := r.URL.Query()
		id := qv.Get("id")
		n, _ := strconv.Atoi(qv.Get("n"))
		rate, _ := strconv.ParseFloat(qv.Get("rate"), 64)
		conc, _ := strconv.Atoi(qv.Get("conc"))
		durMs, _ := strconv.Atoi(qv.Get("dur_ms"))
		if id == "" || n <= 0 {
			http.Error(w, "need id and n > 0", http.StatusBadRequest)
			return
		}
		async := qv.Get("async") == "1"
		writeJSON(w, bump(r.Context(), es, db, shared.EntityKey{Entity: entity, ID: id}, n, rate, max(conc, 1), async,
			time.Duration(durMs)*time.Millisecond))
	})
}

// With dur > 0 (and no rate), the conc writers stop when dur has passed or
// n changes were made, whichever comes first.
func bump(ctx context.Context, es *entitysync.EntitySync, db *store, key shared.EntityKey, n int, rate float64, conc int, async bool, dur time.Duration) bumpResult {
	var (
		mu   sync.Mutex
		res  bumpResult
		durs = make([]int64, 0, min(n, 1<<16))
		wg   sync.WaitGroup
	)
	res.Async = async
	stBefore := es.Bridge.Stats()
	// notify is called right after the change ver was made.
	notify := func(ver version) {
		start := time.Now()
		var err error
		if async {
			err = es.NotifyAsync(key)
		} else {
			err = es.NotifyAllOfChange(key)
		}
		d := time.Since(start)
		mu.Lock()
		defer mu.Unlock()
		res.N++
		durs = append(durs, int64(d))
		res.LastNotify = max(res.LastNotify, start.UnixNano())
		if ver.v > res.LastVersion {
			res.LastVersion = ver.v
		}
		if err != nil {
			res.Errors++
			if res.FirstError == "" {
				res.FirstError = err.Error()
			}
		}
	}
	begin := time.Now()
	if rate > 0 {
		interval := time.Duration(float64(time.Second) / rate)
		for k := range n {
			if ctx.Err() != nil {
				break
			}
			if d := time.Until(begin.Add(time.Duration(k) * interval)); d > 0 {
				time.Sleep(d)
			}
			ver := db.bump(key.ID)
			if k == 0 {
				res.FirstNotify = ver.t
			}
			wg.Add(1)
			go func() { defer wg.Done(); notify(ver) }()
		}
	} else {
		var next atomic.Int64
		res.FirstNotify = time.Now().UnixNano()
		var stop time.Time
		if dur > 0 {
			stop = begin.Add(dur)
		}
		for range conc {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for (stop.IsZero() || time.Now().Before(stop)) && next.Add(1) <= int64(n) && ctx.Err() == nil {
					notify(db.bump(key.ID))
				}
			}()
		}
	}
	wg.Wait()
	res.Done = time.Now().UnixNano()
	if async {
		if err := es.Bridge.FlushNotifications(ctx); err != nil {
			res.FlushErr = err.Error()
		}
		res.Flushed = time.Now().UnixNano()
		st := es.Bridge.Stats()
		res.Published = st.Notifications - stBefore.Notifications
		res.NotifyErrors = st.NotifyErrors - stBefore.NotifyErrors
		res.Pending = st.Pending
	}
	if res.N < n && (dur <= 0 || ctx.Err() != nil) {
		res.Errors += n - res.N
		if res.FirstError == "" {
			res.FirstError = fmt.Sprintf("request cancelled after %d changes", res.N)
		}
	}
	slices.Sort(durs)
	if len(durs) > 0 {
		res.NotifyP50 = durs[len(durs)/2]
		res.NotifyP99 = durs[min(len(durs)-1, len(durs)*99/100)]
		res.NotifyMax = durs[len(durs)-1]
	}
	return res
}
