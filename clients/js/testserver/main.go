// Command testserver is the real back end of the JavaScript client's tests:
// an embedded nsqd and two entity-sync servers sharing it, each behind a TCP
// proxy the tests can cut, plus a small HTTP control API. It is not a demo;
// it exists for clients/js/test.
//
//	go run ./clients/js/testserver -root clients/js
//
// On start it prints one JSON line on stdout:
//
//	{"control":"http://127.0.0.1:P","servers":[{"http":"http://127.0.0.1:A","ws":"ws://127.0.0.1:A/ws/entity-sync/",
//	  "direct":{"http":"http://127.0.0.1:B","ws":"ws://127.0.0.1:B/ws/entity-sync/"}},{...}]}
//
// http and ws go through the server's proxy; direct reaches the server
// itself (as first started: /restart moves it), for tests that watch how a
// connection ends, which a proxy in between would change.
//
// Each server serves the entity type "items" from one shared in-memory
// store (rows {"entity":"items","id":ID,"v":VERSION}; a deleted item has no
// rows), the collection "lists" (key lists/L: list L's items in order, rows
// {"id":ITEM,"text":TEXT,"n":WRITES} named by "id"; see lists.go), the
// entity type "spaced", whose rows a JSON encoder would rewrite (see
// fetchSpaced), the entity type "latin1", whose rows hold invalid UTF-8 (key latin1/ID: rows
// {"id":ID,"name":"caf\xc3"} and {"id":ID,"city":"K\xf6ln"}, as a string
// cut at a byte count and Latin-1 text would give), the entity type "big"
// (key big/N: one row {"id":"N","pad":"xx..."} of N KiB, N from 1 to
// 16384), and the files under
// -root at / (so a page and the client module load from the same origin as
// the websocket). The control API, all GET, answers JSON:
//
//	/bump?server=N&id=ID     increment item ID's version, notify from server N -> {"v":V}
//	/delete?id=ID&server=N   delete item ID, notify from server N                -> {"v":V}
//	/list?server=N&list=L&op=OP&...  change list L (op add, set, remove, move,
//	                         fill: see lists.go), notify from server N   -> {"rows":[...]}
//	/cut?server=N[&down=1]   drop every connection through server N's proxy; with down=1
//	                         refuse new ones until /up                             -> {"cut":K}
//	/up?server=N             serve connections again                                -> {}
//	/restart?server=N        close server N (clients get close code 1001) and start a
//	                         fresh one behind the same address                      -> {}
//	/stats?server=N          -> {"connections":C,"keys":K}: websocket connections server N
//	                         holds, keys with subscribers there
//
// It exits when stdin reaches EOF (the test runner that spawned it went
// away), on SIGINT or SIGTERM.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/shared"
)

const entityItems shared.EntityType = "items"

// entitySpaced serves rows that a JSON encoder would rewrite (see
// fetchSpaced): the server must send them byte for byte.
const entitySpaced shared.EntityType = "spaced"

// fetchSpaced returns, for key spaced/ID, {"id":ID, "n": 2} (spaces, as
// Postgres's jsonb::text writes them) and {"id":ID,"s":"<&>"} followed by a
// raw U+2028, characters encoding/json would escape.
func fetchSpaced(_ context.Context, key shared.EntityKey) ([][]byte, error) {
	id, err := json.Marshal(key.ID)
	if err != nil {
		return nil, err
	}
	return [][]byte{
		fmt.Appendf(nil, `{"id":%s, "n": 2}`, id),
		fmt.Appendf(nil, "{\"id\":%s,\"s\":\"<&>\u2028\"}", id),
	}, nil
}

// entityLatin1 serves rows holding invalid UTF-8 (see fetchLatin1).
const entityLatin1 shared.EntityType = "latin1"

// fetchLatin1 returns rows that json.Valid accepts but that hold invalid
// UTF-8: the server must not put them in a text frame as they are.
func fetchLatin1(_ context.Context, key shared.EntityKey) ([][]byte, error) {
	id, err := json.Marshal(key.ID)
	if err != nil {
		return nil, err
	}
	return [][]byte{
		fmt.Appendf(nil, "{\"id\":%s,\"name\":\"caf\xc3\"}", id),
		fmt.Appendf(nil, "{\"id\":%s,\"city\":\"K\xf6ln\"}", id),
	}, nil
}

// entityBig serves rows as large as their key asks (see fetchBig).
const entityBig shared.EntityType = "big"

// fetchBig returns one row of N KiB for key big/N: a frame a client needs
// a while to read.
func fetchBig(_ context.Context, key shared.EntityKey) ([][]byte, error) {
	kib, err := strconv.Atoi(key.ID)
	if err != nil || kib < 1 || kib > 16<<10 {
		return nil, fmt.Errorf("big/%s: the id is the row's size in KiB, 1 to 16384", key.ID)
	}
	head := fmt.Sprintf(`{"id":%q,"pad":"`, key.ID)
	row := make([]byte, 0, kib<<10)
	row = append(row, head...)
	for len(row) < kib<<10-2 {
		row = append(row, 'x')
	}
	return [][]byte{append(row, '"', '}')}, nil
}

func main() {
	root := flag.String("root", "clients/js", "directory served at / on every server (the page and the client module)")
	servers := flag.Int("servers", 2, "number of entity-sync servers")
	verbose := flag.Bool("v", false, "log everything to stderr")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("testserver: ")

	logger := logrus.New()
	logger.SetOutput(os.Stderr)
	logger.SetLevel(logrus.ErrorLevel)
	if *verbose {
		logger.SetLevel(logrus.DebugLevel)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() { // the parent went away: stop
		_, _ = io.Copy(io.Discard, os.Stdin)
		stop()
	}()

	if *verbose {
		os.Setenv("NSQTEST_VERBOSE", "1") // the embedded nsqd logs too
	}
	if err := run(ctx, *root, *servers, logger); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, root string, n int, logger *logrus.Logger) error {
	if st, err := os.Stat(root); err != nil || !st.IsDir() {
		return fmt.Errorf("-root %q is not a directory", root)
	}
	broker, err := nsqtest.Embed()
	if err != nil {
		return fmt.Errorf("start nsqd: %w", err)
	}
	defer broker.Close()

	h := &harness{store: newStore(), lists: newLists(), root: root, nsqd: broker.TCPAddr(), logger: logger}
	defer h.close()
	for i := 0; i < n; i++ {
		if err := h.addServer(); err != nil {
			return err
		}
	}

	ctl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	ctlSrv := &http.Server{Handler: h.controlMux(), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = ctlSrv.Serve(ctl) }()
	defer ctlSrv.Close()

	type addrs struct {
		HTTP   string `json:"http"`
		WS     string `json:"ws"`
		Direct *addrs `json:"direct,omitempty"`
	}
	at := func(a string) *addrs { return &addrs{HTTP: "http://" + a, WS: "ws://" + a + "/ws/entity-sync/"} }
	out := struct {
		Control string   `json:"control"`
		NSQD    string   `json:"nsqd"`
		Servers []*addrs `json:"servers"`
	}{Control: "http://" + ctl.Addr().String(), NSQD: broker.TCPAddr()}
	for _, s := range h.servers {
		a := at(s.proxy.addr())
		a.Direct = at(s.proxy.targetAddr())
		out.Servers = append(out.Servers, a)
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))

	<-ctx.Done()
	return nil
}

// harness is the set of servers and the shared stores.
type harness struct {
	store  *store
	lists  *lists
	root   string
	nsqd   string
	logger *logrus.Logger

	mu      sync.Mutex
	servers []*server
}

// server is one entity-sync server and the proxy in front of it.
type server struct {
	proxy *proxy
	mu    sync.Mutex
	es    *entitysync.EntitySync
	http  *http.Server
}

func (h *harness) addServer() error {
	s := &server{}
	backend, err := h.startBackend(s)
	if err != nil {
		return err
	}
	p, err := newProxy(backend)
	if err != nil {
		return err
	}
	s.proxy = p
	h.mu.Lock()
	h.servers = append(h.servers, s)
	h.mu.Unlock()
	return nil
}

// startBackend starts an entity-sync server on a fresh port and makes it s's
// current one; it returns its address.
func (h *harness) startBackend(s *server) (string, error) {
	es, err := entitysync.New(entitysync.Config{NSQAddr: h.nsqd, Logger: h.logger})
	if err != nil {
		return "", err
	}
	if err := es.Register(entityItems, h.store.fetch); err != nil {
		_ = es.Close(context.Background())
		return "", err
	}
	if err := es.RegisterCollection(entityLists, h.lists.fetch, esdb.JSONField("id")); err != nil {
		_ = es.Close(context.Background())
		return "", err
	}
	if err := es.Register(entitySpaced, fetchSpaced); err != nil {
		_ = es.Close(context.Background())
		return "", err
	}
	if err := es.Register(entityLatin1, fetchLatin1); err != nil {
		_ = es.Close(context.Background())
		return "", err
	}
	if err := es.Register(entityBig, fetchBig); err != nil {
		_ = es.Close(context.Background())
		return "", err
	}
	es.Mux.PathPrefix("/").Handler(noCache(http.FileServer(http.Dir(h.root))))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		_ = es.Close(context.Background())
		return "", err
	}
	hs := &http.Server{Handler: es.Mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = hs.Serve(ln) }()
	s.mu.Lock()
	s.es, s.http = es, hs
	s.mu.Unlock()
	return ln.Addr().String(), nil
}

func (s *server) shutdown() {
	s.mu.Lock()
	es, hs := s.es, s.http
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = es.Close(ctx) // close frames 1001 first, then the listener
	_ = hs.Shutdown(ctx)
}

func (s *server) current() *entitysync.EntitySync {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.es
}

func (h *harness) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, s := range h.servers {
		s.proxy.close()
		s.shutdown()
	}
}

func (h *harness) server(r *http.Request) (*server, error) {
	i, err := strconv.Atoi(r.URL.Query().Get("server"))
	h.mu.Lock()
	defer h.mu.Unlock()
	if err != nil || i < 0 || i >= len(h.servers) {
		return nil, fmt.Errorf("server must be 0..%d", len(h.servers)-1)
	}
	return h.servers[i], nil
}

func (h *harness) controlMux() *http.ServeMux {
	mux := http.NewServeMux()
	handle := func(path string, f func(r *http.Request, s *server) (any, error)) {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			s, err := h.server(r)
			var v any
			if err == nil {
				v, err = f(r, s)
			}
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Access-Control-Allow-Origin", "*")
			if err != nil {
				w.WriteHeader(http.StatusBadRequest)
				v = map[string]string{"error": err.Error()}
			}
			_ = json.NewEncoder(w).Encode(v)
		})
	}
	change := func(r *http.Request, s *server, deleted bool) (any, error) {
		id := r.URL.Query().Get("id")
		if id == "" {
			return nil, errors.New("id is required")
		}
		v := h.store.set(id, deleted)
		if err := s.current().NotifyAllOfChange(shared.EntityKey{Entity: entityItems, ID: id}); err != nil {
			return nil, err
		}
		return map[string]int{"v": v}, nil
	}
	handle("/bump", func(r *http.Request, s *server) (any, error) { return change(r, s, false) })
	handle("/delete", func(r *http.Request, s *server) (any, error) { return change(r, s, true) })
	handle("/list", h.handleList)
	handle("/cut", func(r *http.Request, s *server) (any, error) {
		if r.URL.Query().Get("down") != "" {
			s.proxy.setDown(true)
		}
		return map[string]int{"cut": s.proxy.cut()}, nil
	})
	handle("/up", func(r *http.Request, s *server) (any, error) {
		s.proxy.setDown(false)
		return struct{}{}, nil
	})
	handle("/restart", func(r *http.Request, s *server) (any, error) {
		s.shutdown()
		backend, err := h.startBackend(s)
		if err != nil {
			return nil, err
		}
		s.proxy.setTarget(backend)
		return struct{}{}, nil
	})
	handle("/stats", func(r *http.Request, s *server) (any, error) {
		es := s.current()
		return map[string]int{"connections": es.Web.Connections(), "keys": es.Bridge.Stats().Keys}, nil
	})
	return mux
}

func noCache(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		h.ServeHTTP(w, r)
	})
}

// store is the shared "database": a version per item, and whether the item
// is deleted.
type store struct {
	mu       sync.Mutex
	versions map[string]int
	deleted  map[string]bool
}

func newStore() *store {
	return &store{versions: make(map[string]int), deleted: make(map[string]bool)}
}

func (s *store) set(id string, deleted bool) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.versions[id]++
	s.deleted[id] = deleted
	return s.versions[id]
}

func (s *store) fetch(_ context.Context, key shared.EntityKey) ([][]byte, error) {
	s.mu.Lock()
	v, gone := s.versions[key.ID], s.deleted[key.ID]
	s.mu.Unlock()
	if gone {
		return nil, nil
	}
	row, err := json.Marshal(map[string]any{"entity": key.Entity, "id": key.ID, "v": v})
	return [][]byte{row}, err
}

// proxy forwards TCP connections to a backend that can be swapped, and can
// drop every connection at once (a network failure: no close frame).
type proxy struct {
	ln net.Listener

	mu     sync.Mutex
	target string
	down   bool
	conns  map[net.Conn]struct{}
}

func newProxy(target string) (*proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &proxy{ln: ln, target: target, conns: make(map[net.Conn]struct{})}
	go p.accept()
	return p, nil
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.pipe(c)
	}
}

// track registers conns, unless the proxy is down; it returns the target.
func (p *proxy) track(cs ...net.Conn) (string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.down {
		return "", false
	}
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
	return p.target, true
}

func (p *proxy) untrack(cs ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range cs {
		delete(p.conns, c)
	}
}

func (p *proxy) pipe(c net.Conn) {
	defer c.Close()
	target, ok := p.track(c)
	if !ok {
		return
	}
	defer p.untrack(c)
	u, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		return
	}
	defer u.Close()
	if _, ok := p.track(u); !ok {
		return
	}
	defer p.untrack(u)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(u, c)
		_ = u.Close()
	}()
	_, _ = io.Copy(c, u)
	_ = c.Close()
	<-done
}

func (p *proxy) cut() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		_ = c.Close()
	}
	return len(p.conns) / 2
}

func (p *proxy) setDown(down bool) {
	p.mu.Lock()
	p.down = down
	p.mu.Unlock()
}

func (p *proxy) targetAddr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.target
}

func (p *proxy) setTarget(t string) {
	p.mu.Lock()
	p.target = t
	p.mu.Unlock()
}

func (p *proxy) close() {
	_ = p.ln.Close()
	p.setDown(true)
	p.cut()
}
