//go:build linux

package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/shared"
)

// The soak's 10-minute runs ended with a few keys one version behind on two
// of three servers: a /write reached a server while it was SIGSTOPped, the
// orchestrator gave up on it after 3 s (and notified through another server,
// before the write), the server resumed, the store applied the bump, and the
// server, whose request context had been cancelled by the orchestrator
// leaving, skipped the notification. Here the client leaves while the store
// is applying the write: the write must still be notified.
func TestWriteIsNotifiedWhenItsClientLeavesMidWrite(t *testing.T) {
	st := &store{versions: make([]int64, 4)}
	applied := make(chan struct{})
	release := make(chan struct{})
	storeSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		st.serveHTTP(httptest.NewRecorder(), r) // applies the bump
		close(applied)
		<-release // the answer is held back until the client has gone
		st.serveHTTP(w, httptest.NewRequest(http.MethodPost, "/get?id=k1", nil))
	}))
	defer storeSrv.Close()
	defer close(release) // let the store's handler end if the test fails early

	notified := make(chan shared.EntityKey, 1)
	h := writeHandler(storeSrv.Client(), storeSrv.URL, "server-under-test", func(k shared.EntityKey) error {
		notified <- k
		return nil
	})
	handlerDone := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer close(handlerDone)
		h(w, r)
	}))
	defer srv.Close()

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/write?id=k1", nil)
	clientDone := make(chan error, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		clientDone <- err
	}()
	select {
	case <-applied:
	case <-time.After(10 * time.Second):
		t.Fatal("the write never reached the store")
	}
	cancel() // the client gives up, as the orchestrator did after 3 s
	<-clientDone
	release <- struct{}{}
	select {
	case k := <-notified:
		if k != (shared.EntityKey{Entity: entity, ID: "k1"}) {
			t.Fatalf("notified %v, want k1", k)
		}
	case <-handlerDone:
		t.Fatal("the handler returned without notifying a write the store applied")
	case <-time.After(10 * time.Second):
		t.Fatal("no notification within 10 s")
	}
	if v, _ := st.snapshot(); v[1] != 1 {
		t.Fatalf("store holds version %d of k1, want 1", v[1])
	}
}
