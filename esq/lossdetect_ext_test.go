package esq_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

func keyBody(id string) []byte {
	b, _ := json.Marshal(shared.EntityKey{Entity: "items", ID: id})
	return b
}

// dropQueue is a broker that silently drops the messages drop selects.
type dropQueue struct {
	esq.Queue
	drop func(body []byte) bool
}

func (q dropQueue) Publish(ctx context.Context, entity shared.EntityType, body []byte) error {
	if q.drop(body) {
		return nil
	}
	return q.Queue.Publish(ctx, entity, body)
}

// Close stops the marks' and holes' timers and waits for their callbacks:
// no goroutine is left, and nothing is published afterwards.
func TestLossCloseLeavesNoGoroutine(t *testing.T) {
	before := len(testkit.Goroutines())
	var mu sync.Mutex
	n := 0
	q := esq.DetectLoss(dropQueue{esq.NewMemory(), func([]byte) bool {
		mu.Lock()
		defer mu.Unlock()
		n++
		return n == 2 // the second message
	}}, testkit.Logger())
	if err := q.Subscribe("items", func([]byte) {}, func() { t.Error("loss reported within grace") }); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := q.Publish(context.Background(), "items", keyBody(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	// The marks' timer (200 ms) and the hole's timer (1 s) are armed.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := q.Close(ctx); err != nil {
		t.Fatal(err)
	}
	testkit.AwaitGoroutines(t, before, 5*time.Second)
	if err := q.Publish(context.Background(), "items", keyBody("late")); err != esq.ErrClosed {
		t.Fatalf("publish after close: %v, want ErrClosed", err)
	}
	if err := q.Subscribe("other", func([]byte) {}, nil); err != esq.ErrClosed {
		t.Fatalf("subscribe after close: %v, want ErrClosed", err)
	}
}

// The in-process queue cannot lose a message: DetectLoss leaves it as it is,
// and 512 concurrent writers, whose publishes overtake each other, are never
// taken for a loss.
func TestLossNoneOnTheInProcessQueueWith512Writers(t *testing.T) {
	const writers, each = 512, 20
	mem := esq.NewMemory()
	q := esq.DetectLoss(mem, testkit.Logger())
	if q != esq.Queue(mem) {
		t.Errorf("DetectLoss wrapped the in-process queue (%T)", q)
	}
	var (
		mu       sync.Mutex
		received int
		losses   int
	)
	if err := q.Subscribe("items", func([]byte) { mu.Lock(); received++; mu.Unlock() },
		func() { mu.Lock(); losses++; mu.Unlock() }); err != nil {
		t.Fatal(err)
	}
	start := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for i := 0; i < each; i++ {
				if err := q.Publish(context.Background(), "items", keyBody(fmt.Sprint(w, "-", i))); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := q.Close(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if received != writers*each || losses != 0 {
		t.Fatalf("received %d of %d, %d losses reported; want all and none", received, writers*each, losses)
	}
}
