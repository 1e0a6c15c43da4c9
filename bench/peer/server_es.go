//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/gorilla/mux"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esq/redisq"
	"github.com/entity-sync/entity-sync/internal/childproc"
	"github.com/entity-sync/entity-sync/shared"
)

// esPath is where entity-sync mounts its websocket endpoint, as documented
// in docs/protocol.md (written out here rather than taken from the
// library, to depend on nothing but its documented API).
const esPath = "/ws/entity-sync/"

// esServer is one entity-sync server under test: its router (websocket
// endpoint and the app's write endpoint), how a change is notified, and
// how many times the app's fetch function ran.
type esServer struct {
	es      *entitysync.EntitySync
	handler http.Handler
	notify  notifyFunc
	fetches atomic.Int64
}

// newSeed builds an entity-sync server exactly as the seed's README does:
// es.Setup on a gorilla/mux router, the entity registered with
// RegisterEntityAndDBHandler and its secret-taking handler (the secret is
// not used: every benchmark client has the same, empty one, so a change
// costs one handler call per server), and Bridge.NotifyAllOfChange called
// from the app's HTTP handler. Clients speak the raw dialect. The queue is
// in-process, or the nsqd at nsqd. With st (the breakdown phase only), the
// bridge reports its rounds to st and the handler notes the version it
// read.
func newSeed(nsqd string, cell *versionCell, log logrus.FieldLogger, st *stamps) (*esServer, error) {
	router := mux.NewRouter()
	config := entitysync.Config{Mux: router, NSQAddr: nsqd, Logger: log, WSPassThrough: func(string, []byte) {}}
	if st != nil {
		config.Bridge.OnRound = st.onRound
	}
	s := &esServer{handler: router}
	s.es = entitysync.Setup(config)
	if err := s.es.Err(); err != nil {
		return nil, err
	}
	err := s.es.RegisterEntityAndDBHandler(entityType, func(key shared.EntityKey, _ string, handler shared.ByteHandler) {
		s.fetches.Add(1)
		id, _ := strconv.Atoi(key.ID)
		v := cell.load(id)
		if st != nil {
			st.fetched(v)
		}
		handler(appendPayload(make([]byte, 0, 48), id, v))
	})
	if err != nil {
		_ = s.es.Close(context.Background())
		return nil, err
	}
	s.notify = func(id int, _ int64) error {
		return s.es.Bridge.NotifyAllOfChange(shared.EntityKey{Entity: entityType, ID: strconv.Itoa(id)})
	}
	router.Handle(changePath, changeHandler(cell, s.notify)).Methods(http.MethodPost)
	return s, nil
}

// newAPI builds an entity-sync server with the library's current API and
// defaults: entitysync.New, Register with a fetch function, and
// NotifyAllOfChange from the app's HTTP handler (on the same router, the
// EntitySync's Mux). Clients speak the envelope dialect.
func newAPI(config entitysync.Config, cell *versionCell) (*esServer, error) {
	es, err := entitysync.New(config)
	if err != nil {
		return nil, err
	}
	s := &esServer{es: es, handler: es.Mux}
	fetch := func(_ context.Context, key shared.EntityKey) ([][]byte, error) {
		s.fetches.Add(1)
		id, _ := strconv.Atoi(key.ID)
		return [][]byte{appendPayload(make([]byte, 0, 48), id, cell.load(id))}, nil
	}
	if err := es.Register(entityType, fetch); err != nil {
		_ = es.Close(context.Background())
		return nil, err
	}
	s.notify = func(id int, _ int64) error {
		return es.NotifyAllOfChange(shared.EntityKey{Entity: entityType, ID: strconv.Itoa(id)})
	}
	es.Mux.Handle(changePath, changeHandler(cell, s.notify)).Methods(http.MethodPost)
	return s, nil
}

// runES runs one entity-sync server (newSeed for role seed, newAPI for
// roles api and api-redis) on its own listener, with the control endpoints on another,
// until the orchestrator lets go.
func runES(cfg config) int {
	log := logrus.New()
	log.SetOutput(os.Stderr)
	log.SetLevel(logrus.WarnLevel)
	if cfg.verbose {
		log.SetLevel(logrus.InfoLevel)
	}
	fail := func(err error) int {
		sayHello(hello{Err: cfg.role + ": " + err.Error()})
		return 1
	}
	cell, err := openCell(cfg.cell)
	if err != nil {
		return fail(err)
	}
	defer cell.close()
	var st *stamps
	if cfg.stamp {
		st = newStamps()
	}
	var s *esServer
	switch cfg.role {
	case "seed":
		s, err = newSeed(cfg.nsqd, cell, log, st)
	case "api-redis":
		// Centrifuge's broker, routed by key as Centrifuge's is by channel:
		// a server hears only the keys its clients watch.
		var q *redisq.Queue
		q, err = redisq.New(context.Background(), redisq.Config{Addr: cfg.redisAddr, ChannelPrefix: cfg.prefix + "es:", RouteByKey: true, Logger: log})
		if err == nil {
			s, err = newAPI(entitysync.Config{Queue: q, Logger: log}, cell)
		}
	default:
		s, err = newAPI(entitysync.Config{NSQAddr: cfg.nsqd, Logger: log}, cell)
	}
	if err != nil {
		return fail(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fail(err)
	}
	if st != nil {
		l = st.listener(l)
	}
	srv := &http.Server{Handler: s.handler, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.WithError(err).Error("serve")
		}
	}()
	ctlMux := serverControl(&s.fetches)
	if st != nil {
		st.control(ctlMux)
	}
	ctl, stopCtl, err := serveControl(ctlMux)
	if err != nil {
		return fail(err)
	}
	defer stopCtl()
	sayHello(hello{WS: "ws://" + l.Addr().String() + esPath, App: "http://" + l.Addr().String(), Ctl: ctl})

	childproc.WaitForParent(childLifetime)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	code := 0
	if err := s.es.Close(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "peer %s: close: %v\n", cfg.role, err)
		code = 1
	}
	_ = srv.Close()
	return code
}
