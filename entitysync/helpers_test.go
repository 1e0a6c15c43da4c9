package entitysync_test

import (
	"context"
	"net/http/httptest"
	"testing"
	"time"

	es "github.com/entity-sync/entity-sync/entitysync"
)

func closeES(t *testing.T, e *es.EntitySync) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.Close(ctx); err != nil {
		t.Errorf("close: %v", err)
	}
}

// newHTTPServer serves e's router without closing e at cleanup (the test
// closes it itself).
func newHTTPServer(t *testing.T, e *es.EntitySync) *httptest.Server {
	srv := httptest.NewServer(e.Mux)
	t.Cleanup(srv.Close)
	return srv
}
