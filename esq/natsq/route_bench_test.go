package natsq_test

import (
	"context"
	"strconv"
	"testing"

	"github.com/entity-sync/entity-sync/esq/natsq"
	"github.com/entity-sync/entity-sync/shared"
)

// What routing by key costs a server against the machine's NATS: a key's
// first subscriber and last unsubscribe (Watch with its flush round trip,
// then Unwatch), and a publish routed to the key's subject next to a
// broadcast one.
//
//	go test -run - -bench . ./esq/natsq/
func BenchmarkWatchUnwatch(b *testing.B) {
	requireMachineNATS(b)
	q := newQueue(b, natsq.Config{URL: machineURL, SubjectPrefix: randomPrefix(b), RouteByKey: true})
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
}

func BenchmarkPublish(b *testing.B) {
	requireMachineNATS(b)
	for _, route := range []bool{false, true} {
		name := "broadcast"
		if route {
			name = "routed"
		}
		b.Run(name, func(b *testing.B) {
			q := newQueue(b, natsq.Config{URL: machineURL, SubjectPrefix: randomPrefix(b), RouteByKey: route})
			body := []byte(`{"entity":"items","id":"12345"}`)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := q.Publish(context.Background(), "items", body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
