//go:build linux

package main

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/entitysync"
)

// TestProtocols runs each system's handshake and the shared read loop
// against a real server of that system (in this process, on 127.0.0.1),
// with the changes made through the app's write endpoint as the driver
// makes them: a client subscribed to two keys must be subscribed to both
// when the handshake returns, then see every version of each key, in
// order, and nothing of a key it did not subscribe to.
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
	serve := func(h http.Handler) string {
		srv := httptest.NewServer(h)
		t.Cleanup(srv.Close)
		return srv.URL
	}
	seed, err := newSeed("", cell, log, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer seed.es.Close(context.Background())
	api, err := newAPI(entitysync.Config{Logger: log}, cell)
	if err != nil {
		t.Fatal(err)
	}
	defer api.es.Close(context.Background())
	node, cfHandler, err := newCFNode("", "", false, cell)
	if err != nil {
		t.Fatal(err)
	}
	defer node.Shutdown(context.Background())

	for _, c := range []struct {
		name, role, base, path string
	}{
		{"seed", "seed", serve(seed.handler), esPath},
		{"api", "api", serve(api.handler), esPath},
		{"centrifuge", "cf", serve(cfHandler), cfPath},
	} {
		t.Run(c.name, func(t *testing.T) {
			proto, err := protocolFor(c.role)
			if err != nil {
				t.Fatal(err)
			}
			keys := []int{7, 8}
			dialer := websocket.Dialer{Subprotocols: proto.subprotocols()}
			ws, _, err := dialer.Dial("ws"+strings.TrimPrefix(c.base, "http")+c.path, nil)
			if err != nil {
				t.Fatal(err)
			}
			initial, err := proto.handshake(ws, keys)
			if err != nil {
				t.Fatal(err)
			}
			var rec recorder
			rec.recording.Store(true)
			client := newWSClient(ws, proto, keys, initial)
			done := make(chan struct{})
			go client.read(&rec, func() { close(done) })

			// Key 9 has no subscriber here: its change must not arrive.
			ids := []int{7, 8, 9, 7, 8, 7}
			res := drive(context.Background(), c.base, ids, 50, 2)
			if res.Errors > 0 || len(res.Changes) != len(ids) {
				t.Fatalf("driver: %d errors (%s), %d changes", res.Errors, res.FirstErr, len(res.Changes))
			}
			last := lastVersions(res.Changes)
			deadline := time.Now().Add(5 * time.Second)
			for (client.maxV[0].Load() < last[7] || client.maxV[1].Load() < last[8]) && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			rec.closing.Store(true)
			ws.Close()
			<-done

			client.mu.Lock()
			defer client.mu.Unlock()
			got := map[int][]int64{}
			for _, a := range client.arrivals {
				got[a.id] = append(got[a.id], a.v)
			}
			want := map[int][]int64{}
			for _, ch := range res.Changes {
				if ch.ID != 9 {
					want[ch.ID] = append(want[ch.ID], ch.V)
				}
			}
			for _, k := range keys {
				// Spaced 20 ms apart, so latest-wins has no reason to skip one.
				if !slices.Equal(got[k], want[k]) {
					t.Errorf("key %d: versions received %v, want %v", k, got[k], want[k])
				}
			}
			if n := rec.readErrors.Load() + rec.backwards.Load() + rec.strays.Load(); n != 0 || len(got) != 2 {
				t.Errorf("%d read errors, versions going backwards or strays; keys received %d, want 2", n, len(got))
			}
		})
	}
}
