//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/internal/childproc"
	"github.com/entity-sync/entity-sync/shared"
)

// esPath is where entitysync.New mounts the websocket endpoint on its Mux,
// as documented in docs/protocol.md (written out here rather than taken
// from the transport package, to depend on nothing but package entitysync).
const esPath = "/ws/entity-sync/"

// newES builds an entity-sync server with the library's defaults: the
// in-process queue, or the nsqd at nsqd. Its fetch function reads the
// version from the shared cell and returns the entity's one row; notify
// calls NotifyAllOfChange for the entity (the version travels through the
// cell, not the notification, as with a real database). With st (the
// breakdown phase only), the bridge reports its rounds to st
// (esbridge.Options.OnRound) and the fetch notes the version it read.
func newES(nsqd string, cell *versionCell, log logrus.FieldLogger, st *stamps) (*entitysync.EntitySync, notifyFunc, error) {
	cfg := entitysync.Config{NSQAddr: nsqd, Logger: log}
	if st != nil {
		cfg.Bridge.OnRound = st.onRound
	}
	es, err := entitysync.New(cfg)
	if err != nil {
		return nil, nil, err
	}
	fetch := func(_ context.Context, _ shared.EntityKey) ([][]byte, error) {
		v := cell.load()
		if st != nil {
			st.fetched(v)
		}
		return [][]byte{appendPayload(make([]byte, 0, 48), v)}, nil
	}
	if err := es.Register(entityType, fetch); err != nil {
		_ = es.Close(context.Background())
		return nil, nil, err
	}
	key := shared.EntityKey{Entity: entityType, ID: entityID}
	return es, func(int64) error { return es.NotifyAllOfChange(key) }, nil
}

// runES runs one entity-sync server (newES) on its own listener, with the
// control endpoints on another, until the orchestrator lets go.
func runES(cfg config) int {
	log := logrus.New()
	log.SetOutput(os.Stderr)
	log.SetLevel(logrus.WarnLevel)
	if cfg.verbose {
		log.SetLevel(logrus.InfoLevel)
	}
	fail := func(err error) int {
		sayHello(hello{Err: "es: " + err.Error()})
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
	es, notify, err := newES(cfg.nsqd, cell, log, st)
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
	srv := &http.Server{Handler: es.Mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.WithError(err).Error("serve")
		}
	}()
	mux := serverControl(cell, notify)
	if st != nil {
		st.control(mux)
	}
	ctl, stopCtl, err := serveControl(mux)
	if err != nil {
		return fail(err)
	}
	defer stopCtl()
	sayHello(hello{WS: "ws://" + l.Addr().String() + esPath, Ctl: ctl})

	childproc.WaitForParent(childLifetime)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	code := 0
	if err := es.Close(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "peer es: close: %v\n", err)
		code = 1
	}
	_ = srv.Close()
	return code
}
