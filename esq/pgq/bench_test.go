package pgq_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq/pgq"
	"github.com/entity-sync/entity-sync/internal/pgtest"
)

// benchQueue is newQueue for benchmarks.
func benchQueue(b *testing.B, channel string) *pgq.Queue {
	b.Helper()
	pgtest.Require(b)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := pgq.New(ctx, pgq.Config{ConnString: pgtest.DSN(), Channel: channel})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { q.Close(context.Background()) })
	return q
}

// Publish throughput: each publish is one committed transaction, and
// Postgres serialises the commits of transactions that notified. With
// several publishers, the listener's deliveries are counted too.
func BenchmarkPublish(b *testing.B) {
	for _, publishers := range []int{1, 4, 16} {
		b.Run(fmt.Sprintf("publishers=%d", publishers), func(b *testing.B) {
			ch := pgtest.Name(b, "es_bench_")
			pub := benchQueue(b, ch)
			sub := benchQueue(b, ch)
			var got atomic.Int64
			done := make(chan struct{})
			want := int64(b.N)
			if err := sub.Subscribe("items", func([]byte) {
				if got.Add(1) == want {
					close(done)
				}
			}, nil); err != nil {
				b.Fatal(err)
			}
			body := []byte(`{"entity":"items","id":"100"}`)
			var next atomic.Int64
			b.ResetTimer()
			start := time.Now()
			errs := make(chan error, publishers)
			for p := 0; p < publishers; p++ {
				go func() {
					for next.Add(1) <= want {
						if err := pub.Publish(context.Background(), "items", body); err != nil {
							errs <- err
							return
						}
					}
					errs <- nil
				}()
			}
			for p := 0; p < publishers; p++ {
				if err := <-errs; err != nil {
					b.Fatal(err)
				}
			}
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				b.Fatalf("%d of %d delivered", got.Load(), want)
			}
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "notifies/s")
		})
	}
}

// Latency from Publish to the callback on another server's queue, one
// notification at a time.
func BenchmarkPublishToDelivery(b *testing.B) {
	ch := pgtest.Name(b, "es_bench_")
	pub := benchQueue(b, ch)
	sub := benchQueue(b, ch)
	got := make(chan struct{}, 1)
	if err := sub.Subscribe("items", func([]byte) { got <- struct{}{} }, nil); err != nil {
		b.Fatal(err)
	}
	body := []byte(`{"entity":"items","id":"100"}`)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := pub.Publish(context.Background(), "items", body); err != nil {
			b.Fatal(err)
		}
		<-got
	}
}
