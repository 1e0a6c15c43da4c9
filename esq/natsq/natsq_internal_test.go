package natsq

import (
	"context"
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

// The tests of this file need the machine's NATS server (127.0.0.1:4222)
// and a hand on the queue's insides; the others are in natsq_test.go.

func internalQueue(t *testing.T, prefix string) *Queue {
	t.Helper()
	if c, err := net.DialTimeout("tcp", "127.0.0.1:4222", time.Second); err != nil {
		t.Skip("no NATS server on 127.0.0.1:4222")
	} else {
		c.Close()
	}
	l := logrus.New()
	l.SetLevel(logrus.PanicLevel)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := New(ctx, Config{URL: "nats://127.0.0.1:4222", SubjectPrefix: prefix, RouteByKey: true, Logger: l})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close(context.Background()) })
	return q
}

// watchers returns how many Watch calls q counts for key.
func (q *Queue) watchers(key shared.EntityKey) int {
	base, _ := Subject(q.cfg.SubjectPrefix, key.Entity)
	q.mu.RLock()
	defer q.mu.RUnlock()
	return q.watches.Count(keySubject(base, esq.RouteToken(key.ID)))
}

// A key's first Watch that nats.go refuses (as it does on a draining
// connection) while another Watch of the key waits for it: both return the
// error and both count, so the Unwatch of one of them, after a third Watch
// subscribed, leaves the key watched and its messages arriving.
func TestRefusedWatchKeepsTheWaitersCount(t *testing.T) {
	prefix := "esqtest.refused." + time.Now().Format("150405.000000000") + "."
	sub, pub := internalQueue(t, prefix), internalQueue(t, prefix)
	got := make(chan string, 16)
	if err := sub.Subscribe("items", func(b []byte) { got <- string(b) }, nil); err != nil {
		t.Fatal(err)
	}
	key := shared.EntityKey{Entity: "items", ID: "refused"}
	refusal := errors.New("refused (test)")
	entered, refuse := make(chan struct{}), make(chan struct{})
	var calls atomic.Int32
	real := sub.subscribeKey
	sub.subscribeKey = func(subject string, ch chan *nats.Msg) (*nats.Subscription, error) {
		if calls.Add(1) == 1 {
			close(entered)
			<-refuse
			return nil, refusal
		}
		return real(subject, ch)
	}
	first, second := make(chan error, 1), make(chan error, 1)
	go func() { first <- sub.Watch(key) }()
	<-entered
	go func() { second <- sub.Watch(key) }()
	for deadline := time.Now().Add(10 * time.Second); sub.watchers(key) != 2; {
		if time.Now().After(deadline) {
			t.Fatalf("the second Watch is not counted: %d watchers", sub.watchers(key))
		}
		time.Sleep(time.Millisecond) // polls the count: no event to await
	}
	close(refuse)
	for _, c := range []chan error{first, second} {
		if err := <-c; !errors.Is(err, refusal) {
			t.Fatalf("Watch returned %v, want the refusal", err)
		}
	}
	if err := sub.Watch(key); err != nil { // subscribes again
		t.Fatal(err)
	}
	sub.Unwatch(key) // the second Watch's
	if n := sub.watchers(key); n != 2 {
		t.Fatalf("%d watchers after one of three Unwatches, want 2", n)
	}
	body := `{"entity":"items","id":"refused"}`
	if err := pub.Publish(context.Background(), "items", []byte(body)); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if b != body {
			t.Fatalf("received %s", b)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the key's message did not arrive: its subscription was dropped while two Watches hold it")
	}
	sub.Unwatch(key)
	sub.Unwatch(key)
	if n := sub.watchers(key); n != 0 {
		t.Fatalf("%d watchers after every Unwatch, want 0", n)
	}
}
