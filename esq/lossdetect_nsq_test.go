package esq_test

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// The defect DetectLoss exists for: a server stalls (here its onMessage
// blocks on the first message) while more changes are published than its
// ephemeral channel holds (nsqd's --mem-queue-size, 10 here, plus what is in
// flight). nsqd drops the rest without a word and the connection never
// drops, so the NSQ queue's own watcher sees nothing. Through DetectLoss,
// onLoss is called once the server catches up.
func TestLossDetectedWhenNSQChannelOverflows(t *testing.T) {
	const memQueue, published = 10, 500
	nsqd := nsqtest.StartNSQDWith(t, nsqtest.Options{MemQueueSize: memQueue})
	nq, err := esq.NewNSQ(esq.NSQConfig{NSQDAddrs: []string{nsqd.TCPAddr()}, Logger: testkit.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	q := esq.DetectLoss(nq, testkit.Logger())
	t.Cleanup(func() { q.Close(context.Background()) })

	var received atomic.Int64
	first := make(chan struct{})
	unblock := make(chan struct{})
	var once sync.Once
	lost := make(chan struct{}, 100)
	err = q.Subscribe("items", func([]byte) {
		received.Add(1)
		once.Do(func() {
			close(first)
			<-unblock // the stalled server
		})
	}, func() { lost <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := q.Publish(ctx, "items", keyBody("first")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-first:
	case <-time.After(10 * time.Second):
		t.Fatal("first message not received")
	}
	for i := 0; i < published; i++ {
		if err := q.Publish(ctx, "items", keyBody(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	close(unblock)
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatalf("no loss reported; received %d of %d", received.Load(), published+1)
	}
	if n := received.Load(); n > published {
		t.Fatalf("received %d of %d: nsqd dropped nothing, the test proves nothing", n, published+1)
	}
	t.Logf("nsqd delivered %d of %d messages; the loss was reported", received.Load(), published+1)
}

// Several publishers through one nsqd, some of them publishing concurrently:
// nothing is lost, so nothing may be reported (a false loss costs a resync of
// every subscribed key).
func TestLossNoFalseLossOverNSQ(t *testing.T) {
	const publishers, goroutines, each = 3, 4, 300
	nsqd := nsqtest.StartNSQD(t)
	cfg := esq.NSQConfig{NSQDAddrs: []string{nsqd.TCPAddr()}, Logger: testkit.Logger()}
	sub, err := esq.NewNSQ(cfg)
	if err != nil {
		t.Fatal(err)
	}
	q := esq.DetectLoss(sub, testkit.Logger())
	t.Cleanup(func() { q.Close(context.Background()) })
	total := publishers * goroutines * each
	var received atomic.Int64
	all := make(chan struct{})
	end := make(chan struct{})
	err = q.Subscribe("items", func(b []byte) {
		if string(b) == `{"entity":"items","id":"end"}` {
			close(end)
			return
		}
		if received.Add(1) == int64(total) {
			close(all)
		}
	}, func() { t.Error("loss reported with nothing lost") })
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	marks := make([]chan struct{}, publishers)
	raw := make([]*esq.NSQ, publishers)
	for p := 0; p < publishers; p++ {
		pq, err := esq.NewNSQ(cfg)
		if err != nil {
			t.Fatal(err)
		}
		raw[p] = pq
		marks[p] = make(chan struct{}, 10)
		pub := esq.DetectLoss(markTap{pq, marks[p]}, testkit.Logger())
		t.Cleanup(func() { pub.Close(context.Background()) })
		for g := 0; g < goroutines; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < each; i++ {
					if err := pub.Publish(context.Background(), "items", keyBody(fmt.Sprint(p, "-", g, "-", i))); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	select {
	case <-all:
	case <-time.After(30 * time.Second):
		t.Fatalf("received %d of %d", received.Load(), total)
	}
	// Each publisher's first mark has been accepted by nsqd; a plain
	// message published after them all comes out of the channel after them,
	// so once it is received the marks have been checked.
	for p := range marks {
		select {
		case <-marks[p]:
		case <-time.After(10 * time.Second):
			t.Fatalf("publisher %d sent no mark", p)
		}
	}
	if err := raw[0].Publish(context.Background(), "items", []byte(`{"entity":"items","id":"end"}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-end:
	case <-time.After(10 * time.Second):
		t.Fatal("last message not received")
	}
}

// markTap signals on marks each mark its queue has accepted.
type markTap struct {
	esq.Queue
	marks chan struct{}
}

func (m markTap) Publish(ctx context.Context, entity shared.EntityType, body []byte) error {
	err := m.Queue.Publish(ctx, entity, body)
	if err == nil && bytes.HasPrefix(body, []byte(`{"_es":`)) {
		select {
		case m.marks <- struct{}{}:
		default:
		}
	}
	return err
}
