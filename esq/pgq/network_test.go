package pgq_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq/pgq"
	"github.com/entity-sync/entity-sync/internal/pgtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
)

// A network that stops carrying bytes without closing anything: the health
// check finds the silent listening connection dead, the queue reconnects
// once the network is back, and calls onLoss.
func TestNetworkFrozen(t *testing.T) {
	t.Parallel()
	proxy := pgtest.StartProxy(t)
	ch := pgtest.Name(t, "es_chan_")
	q := newQueue(t, ch, func(c *pgq.Config) {
		c.ConnString = proxy.DSN()
		c.HealthCheckInterval = 100 * time.Millisecond
		c.Timeout = time.Second
		c.Logger = testkit.SilentLogger()
	})
	r := subscribe(t, q, "items")
	peer := newQueue(t, ch, nil) // straight to Postgres

	proxy.Freeze()
	// The health check times out and the listener is being reconnected.
	testkit.AwaitCond(t, wait, func() (bool, string) {
		return q.ListenerPID() == 0, "listener still counted as live"
	})
	// Only a reconnect after Thaw counts (a health check slowed down by a
	// loaded machine may have reconnected once before).
	for len(r.loss) > 0 {
		<-r.loss
	}
	if err := peer.Publish(ctxT(t), "items", []byte(keyJSON("items", "while-frozen"))); err != nil {
		t.Fatal(err)
	}
	proxy.Thaw()
	r.awaitLoss(t)
	if err := peer.Publish(ctxT(t), "items", []byte(keyJSON("items", "after"))); err != nil {
		t.Fatal(err)
	}
	// What was sent while the listener was away is lost (onLoss covers it);
	// what is sent after onLoss arrives.
	for {
		if m := r.next(t); m == keyJSON("items", "after") {
			break
		} else if m != keyJSON("items", "while-frozen") {
			t.Fatalf("unexpected %s", m)
		}
	}
}

// Postgres unreachable: Publish fails, Subscribe waits for the listener to be
// back (or gives up after Config.Timeout), and everything works again once
// it is back, after onLoss.
func TestPostgresDown(t *testing.T) {
	t.Parallel()
	proxy := pgtest.StartProxy(t)
	ch := pgtest.Name(t, "es_chan_")
	q := newQueue(t, ch, func(c *pgq.Config) {
		c.ConnString = proxy.DSN()
		c.Timeout = 2 * time.Second
		c.Logger = testkit.SilentLogger()
	})
	items := subscribe(t, q, "items")
	peer := newQueue(t, ch, nil)

	proxy.Stop()
	testkit.AwaitCond(t, wait, func() (bool, string) {
		return q.ListenerPID() == 0, "listener still counted as live"
	})
	if err := q.Publish(ctxT(t), "items", []byte(keyJSON("items", "down"))); err == nil {
		t.Fatal("Publish succeeded with Postgres unreachable")
	} else {
		t.Logf("publish while down: %v", err)
	}
	// Subscribe gives up after Timeout, and the type can be subscribed again.
	start := time.Now()
	if err := q.Subscribe("users", func([]byte) {}, nil); err == nil {
		t.Fatal("Subscribe returned nil with no listener")
	} else if d := time.Since(start); d < time.Second || d > 5*time.Second {
		t.Errorf("Subscribe gave up after %s, Timeout is 2s", d)
	}
	// A Subscribe that starts while down returns once the listener is back.
	subscribed := make(chan error, 1)
	users := &recorder{msgs: make(chan string, 10), loss: make(chan struct{}, 10)}
	go func() {
		subscribed <- q.Subscribe("users", func(b []byte) { users.msgs <- string(b) }, func() { users.loss <- struct{}{} })
	}()
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-subscribed:
		if err != nil {
			t.Fatalf("Subscribe after Postgres came back: %v", err)
		}
	case <-time.After(wait):
		t.Fatal("Subscribe still waiting")
	}
	if q.ListenerPID() == 0 {
		t.Fatal("Subscribe returned before the listener was back")
	}
	items.awaitLoss(t)
	for i, e := range []string{"items", "users"} {
		if err := peer.Publish(ctxT(t), "items", []byte(keyJSON("items", fmt.Sprint(i)))); err != nil {
			t.Fatal(err)
		}
		if err := q.Publish(ctxT(t), "users", []byte(keyJSON("users", fmt.Sprint(i)))); err != nil {
			t.Fatalf("publish %s after Postgres came back: %v", e, err)
		}
	}
	items.expect(t, keyJSON("items", "0"), keyJSON("items", "1"))
	users.expect(t, keyJSON("users", "0"), keyJSON("users", "1"))
}
