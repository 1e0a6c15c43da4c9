//go:build linux

package main

import (
	"context"
	"io"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"
)

// TestProtocols runs each system's handshake and the shared read loop
// against a real server of that system (in this process, on 127.0.0.1):
// the client must be subscribed when the handshake returns, and then see
// every version notified, in order.
func TestProtocols(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cell")
	if err := createCell(path); err != nil {
		t.Fatal(err)
	}
	cell, err := openCell(path)
	if err != nil {
		t.Fatal(err)
	}
	defer cell.close()

	log := logrus.New()
	log.SetOutput(io.Discard)
	es, esNotify, err := newES("", cell, log, nil)
	if err != nil {
		t.Fatal(err)
	}
	esSrv := httptest.NewServer(es.Mux)
	defer esSrv.Close()
	defer es.Close(context.Background())

	node, cfHandler, cfNotify, err := newCFNode("", "", false)
	if err != nil {
		t.Fatal(err)
	}
	cfSrv := httptest.NewServer(cfHandler)
	defer cfSrv.Close()
	defer node.Shutdown(context.Background())

	for _, c := range []struct {
		name   string
		proto  protocol
		url    string
		notify notifyFunc
	}{
		{"entity-sync", esProtocol{}, esSrv.URL + esPath, esNotify},
		{"centrifuge", cfProtocol{}, cfSrv.URL + cfPath, cfNotify},
	} {
		t.Run(c.name, func(t *testing.T) {
			ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(c.url, "http"), nil)
			if err != nil {
				t.Fatal(err)
			}
			v0, err := c.proto.handshake(ws)
			if err != nil {
				t.Fatal(err)
			}
			var rec recorder
			rec.recording.Store(true)
			client := &wsClient{ws: ws, proto: c.proto}
			client.maxV.Store(v0)
			done := make(chan struct{})
			go client.read(&rec, func() { close(done) })

			var first, last int64
			for i := range 3 {
				v := cell.bump()
				if i == 0 {
					first = v
				}
				last = v
				if err := c.notify(v); err != nil {
					t.Fatal(err)
				}
				// Spaced, so entity-sync's latest-wins has no reason to skip one.
				time.Sleep(20 * time.Millisecond)
			}
			deadline := time.Now().Add(5 * time.Second)
			for client.maxV.Load() < last && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			rec.closing.Store(true)
			ws.Close()
			<-done

			client.mu.Lock()
			defer client.mu.Unlock()
			var got []int64
			for _, a := range client.arrivals {
				got = append(got, a.v)
			}
			if len(got) != 3 || got[0] != first || got[2] != last {
				t.Errorf("versions received %v, want %d..%d", got, first, last)
			}
			if n := rec.readErrors.Load() + rec.backwards.Load(); n != 0 {
				t.Errorf("%d read errors or versions going backwards", n)
			}
		})
	}
}
