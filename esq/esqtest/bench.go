package esqtest

import (
	"context"
	"strconv"
	"testing"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

// RoutingQueue is a queue that can route by key (see esq.Interest).
type RoutingQueue interface {
	esq.Queue
	esq.Interest
}

// BenchRouting measures what routing by key costs a server: a key's first
// subscriber and last unsubscribe (Watch, which waits for the broker's
// confirmation, then Unwatch), and a publish routed to the key's own
// subject or channel next to a broadcast one, each from a body and, for
// an esq.KeyQueue, from the key (PublishKey, the bridge's way). newQueue
// returns a fresh queue on its own prefix, routing by key when route is
// set; the benchmark closes nothing (newQueue registers its own cleanup).
func BenchRouting(b *testing.B, newQueue func(b *testing.B, route bool) RoutingQueue) {
	b.Run("WatchUnwatch", func(b *testing.B) {
		q := newQueue(b, true)
		if err := q.Subscribe("items", func([]byte) {}, nil); err != nil {
			b.Fatal(err)
		}
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			k := shared.EntityKey{Entity: "items", ID: strconv.Itoa(i)}
			if err := q.Watch(k); err != nil {
				b.Fatal(err)
			}
			q.Unwatch(k)
		}
	})
	for _, route := range []bool{false, true} {
		name := "Publish/broadcast"
		if route {
			name = "Publish/routed"
		}
		b.Run(name, func(b *testing.B) {
			q := newQueue(b, route)
			body := []byte(`{"entity":"items","id":"12345"}`)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := q.Publish(context.Background(), "items", body); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("Publish"+name[len("Publish"):]+"-key", func(b *testing.B) {
			q := esq.Keys(newQueue(b, route))
			if q == nil {
				b.Skip("not an esq.KeyQueue")
			}
			key := shared.EntityKey{Entity: "items", ID: "12345"}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := q.PublishKey(context.Background(), key); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
