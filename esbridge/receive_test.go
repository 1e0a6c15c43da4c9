package esbridge_test

import (
	"context"
	"testing"
	"time"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// A fan-out that holds its key for long (here: a row filter that blocks)
// must not hold up notifications: with the in-process queue, NotifyAllOfChange
// runs the receiving side synchronously, so a blocked receive would block
// the notifier too.
func TestNotificationsDoNotWaitForALongFanOut(t *testing.T) {
	const wait = 10 * time.Second
	slow := shared.EntityKey{Entity: "items", ID: "slow"}
	other := shared.EntityKey{Entity: "items", ID: "other"}
	gate := make(chan struct{})
	entered := make(chan struct{}, 16)
	var gateOpen bool
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, es.Config{Bridge: esbridge.Options{
		Filter: func(_ context.Context, k shared.EntityKey, rows [][]byte) [][]byte {
			if k == slow && store.Version(slow) > 0 {
				entered <- struct{}{}
				<-gate
			}
			return rows
		},
	}})
	t.Cleanup(func() {
		if !gateOpen {
			close(gate)
		}
	})
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	ws := testkit.Dial(t, srv)
	ws.Subscribe("items", "slow")
	ws.Subscribe("items", "other")
	ws.AwaitKeys(wait, slow, other)

	store.Bump(slow)
	if err := e.NotifyAllOfChange(slow); err != nil {
		t.Fatal(err)
	}
	select {
	case <-entered: // the round for slow now holds its key
	case <-time.After(wait):
		t.Fatal("fan-out of slow did not start")
	}

	done := make(chan struct{})
	go func() {
		defer close(done)
		store.Bump(slow)
		_ = e.NotifyAllOfChange(slow) // must not wait for the blocked fan-out
		v := store.Bump(other)
		_ = e.NotifyAllOfChange(other)
		ws.Await(wait, "other's change while slow is blocked", testkit.Is("items", "other", v))
	}()
	select {
	case <-done:
	case <-time.After(wait):
		t.Fatal("a notification waited for another key's fan-out")
	}

	gateOpen = true
	close(gate)
	ws.Await(wait, "slow's final state", testkit.Is("items", "slow", store.Version(slow)))
}
