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
	"github.com/entity-sync/entity-sync/shared"
)

// esPath is where entitysync.New mounts the websocket endpoint on its Mux,
// as documented in docs/protocol.md (written out here rather than taken
// from the transport package, to depend on nothing but package entitysync).
const esPath = "/ws/entity-sync/"

// runES runs one entity-sync server with the library's defaults: the
// in-process queue, or the nsqd given by -nsqd. Its fetch function reads
// the version from the shared cell and returns the entity's one row.
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

	es, err := entitysync.New(entitysync.Config{NSQAddr: cfg.nsqd, Logger: log})
	if err != nil {
		return fail(err)
	}
	fetch := func(_ context.Context, _ shared.EntityKey) ([][]byte, error) {
		return [][]byte{appendPayload(make([]byte, 0, 48), cell.load())}, nil
	}
	if err := es.Register(entityType, fetch); err != nil {
		return fail(err)
	}
	key := shared.EntityKey{Entity: entityType, ID: entityID}
	notify := func(int64) error { return es.NotifyAllOfChange(key) }

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fail(err)
	}
	srv := &http.Server{Handler: es.Mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.WithError(err).Error("serve")
		}
	}()
	ctl, stopCtl, err := serveControl(serverControl(cell, notify))
	if err != nil {
		return fail(err)
	}
	defer stopCtl()
	sayHello(hello{WS: "ws://" + l.Addr().String() + esPath, Ctl: ctl})

	waitForParent()
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
