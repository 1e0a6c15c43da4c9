package esq_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
)

// blackHole listens on a random port, takes every TCP connection and never
// answers on it: an nsqd that hangs, or a host behind a firewall that
// accepts but forwards nothing. A dial then waits for nsqd's IDENTIFY
// answer until the dial timeout (1s). release (also run when the
// test ends) closes the connections, which ends any dial still waiting;
// call it before closing a queue, whose Close waits a while for its dials.
func blackHole(t *testing.T) (addr string, release func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	var once sync.Once
	release = func() {
		once.Do(func() {
			ln.Close()
			<-done
			mu.Lock()
			for _, c := range conns {
				c.Close()
			}
			mu.Unlock()
		})
	}
	t.Cleanup(release)
	return ln.Addr().String(), release
}

// TestNSQPublishGivesUpWhenCtxEnds: Publish to an nsqd that never answers
// returns when its ctx ends, with the ctx's error.
func TestNSQPublishGivesUpWhenCtxEnds(t *testing.T) {
	hole, release := blackHole(t)
	q, err := esq.NewNSQ(esq.NSQConfig{NSQDAddrs: []string{hole}, Logger: testkit.SilentLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { release(); q.Close(context.Background()) })

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	res := make(chan error, 1)
	start := time.Now()
	go func() { res <- q.Publish(ctx, "items", []byte(`{"entity":"items","id":"1"}`)) }()
	select {
	case err := <-res:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Publish returned %v, want an error wrapping context.DeadlineExceeded", err)
		}
		// The deadline is 100ms; the dial timeout is 1s. Anything near it
		// means ctx was not heeded.
		if d := time.Since(start); d > 900*time.Millisecond {
			t.Fatalf("Publish took %s after a 100ms deadline", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Publish did not return within 5s of a 100ms deadline")
	}

	// An ended ctx fails at once, before any network work.
	done, cancelDone := context.WithCancel(context.Background())
	cancelDone()
	if err := q.Publish(done, "items", []byte(`{}`)); !errors.Is(err, context.Canceled) {
		t.Fatalf("Publish with a cancelled ctx returned %v", err)
	}
}

// TestNSQPublishFailsOverPastBlackHole: with a black-holed nsqd first in
// NSQDAddrs and a real one second, many concurrent publishes all complete
// quickly through the second: the first address's dial is made once, in the
// background, not by every publish in turn while holding a lock.
func TestNSQPublishFailsOverPastBlackHole(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)

	// The consumer reads from the real nsqd only.
	sub, err := esq.NewNSQ(esq.NSQConfig{NSQDAddrs: []string{nsqd.TCPAddr()}, Logger: testkit.SilentLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sub.Close(context.Background()) })
	const n = 200
	got := make(chan string, 2*n)
	if err := sub.Subscribe("items", func(b []byte) { got <- string(b) }, nil); err != nil {
		t.Fatal(err)
	}

	hole, release := blackHole(t)
	pub, err := esq.NewNSQ(esq.NSQConfig{NSQDAddrs: []string{hole, nsqd.TCPAddr()}, Logger: testkit.SilentLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { release(); pub.Close(context.Background()) })

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	errs := make(chan error, n)
	for i := range n {
		go func() {
			errs <- pub.Publish(ctx, "items", fmt.Appendf(nil, `{"entity":"items","id":"%d"}`, i))
		}()
	}
	for range n {
		select {
		case err := <-errs:
			if err != nil {
				t.Fatalf("publish: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("publishes still not done after %s", time.Since(start))
		}
	}
	// One publish may wait out one dial timeout (1s) before it fails over;
	// serialised dials would take n seconds.
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("%d concurrent publishes took %s", n, d)
	}
	seen := map[string]bool{}
	for len(seen) < n {
		select {
		case b := <-got:
			seen[b] = true
		case <-time.After(10 * time.Second):
			t.Fatalf("received %d of %d messages", len(seen), n)
		}
	}

	// Later publishes do not wait for the black hole either.
	start = time.Now()
	for i := range 50 {
		if err := pub.Publish(ctx, "items", fmt.Appendf(nil, `{"entity":"items","id":"seq-%d"}`, i)); err != nil {
			t.Fatalf("publish: %v", err)
		}
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("50 sequential publishes took %s", d)
	}
}
