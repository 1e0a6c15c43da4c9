package entitysync_test

import (
	"context"
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
