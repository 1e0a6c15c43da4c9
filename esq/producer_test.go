package esq

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/internal/nsqtest"
)

// The producer answers nsqd's heartbeats: nsqd drops a client silent for
// two heartbeat intervals, so an idle producer that did not answer would
// dial again for its next publish.
func TestProducerAnswersHeartbeats(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	p := newProducer(nsqd.TCPAddr(), silentLogger())
	p.heartbeat = time.Second // nsqd's smallest heartbeat interval
	t.Cleanup(func() { p.Stop(context.Background()) })
	ctx := context.Background()
	if err := p.publish(ctx, "producer_heartbeats", []byte(`{"n":1}`), true); err != nil {
		t.Fatal(err)
	}
	current := func() *producerConn {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.cur
	}
	first := current()
	// Idle for three heartbeat intervals.
	time.Sleep(3500 * time.Millisecond)
	if current() != first {
		t.Fatal("the idle connection was lost: nsqd's heartbeats went unanswered")
	}
	if err := p.publish(ctx, "producer_heartbeats", []byte(`{"n":2}`), true); err != nil {
		t.Fatal(err)
	}
	if current() != first {
		t.Fatal("the publish after the idle time dialled a new connection")
	}
}

// nsqd's refusal reaches the publish it answers, and the producer goes on:
// nsqd closes the connection after a fatal error such as a bad topic name,
// and the next publish dials a new one.
func TestProducerPassesOnRefusals(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	p := newProducer(nsqd.TCPAddr(), silentLogger())
	t.Cleanup(func() { p.Stop(context.Background()) })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.publish(ctx, "good", []byte(`{"n":1}`), true); err != nil {
		t.Fatal(err)
	}
	err := p.publish(ctx, "bad!topic", []byte(`{"n":2}`), true)
	if err == nil || !strings.Contains(err.Error(), "E_BAD_TOPIC") {
		t.Fatalf("publish to an invalid topic returned %v, want nsqd's E_BAD_TOPIC", err)
	}
	if err := p.publish(ctx, "good", []byte(`{"n":3}`), true); err != nil {
		t.Fatalf("publish after a refusal: %v", err)
	}
}
