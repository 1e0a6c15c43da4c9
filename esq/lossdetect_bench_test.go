package esq

import (
	"context"
	"testing"
)

// The stamp and the check alone, per message: Publish's stamping of a key
// and Subscribe's parse and sequence check.
func BenchmarkLossDetectStampAndCheck(b *testing.B) {
	d := newLossDetector(newFakeBroker(), defaultLossTiming)
	defer d.Close(context.Background())
	s := &seqSub{d: d, onMessage: func([]byte) {}, peers: make(map[string]*seqPeer)}
	body := []byte(`{"entity":"items","id":"100"}`)
	b.ReportAllocs()
	for i := 1; b.Loop(); i++ {
		at, _ := stampAt(body)
		s.handle(stamp(body, at, d.id, uint64(i)))
	}
}

// Publish and delivery through the in-process queue, without and with
// DetectLoss: the difference is what loss detection adds per message,
// sequence bookkeeping and the marks' timer included.
func BenchmarkMemoryPublish(b *testing.B) {
	for _, c := range []struct {
		name string
		wrap func(Queue) Queue
	}{
		{"plain", func(q Queue) Queue { return q }},
		{"DetectLoss", func(q Queue) Queue { return DetectLoss(q, nil) }},
	} {
		b.Run(c.name, func(b *testing.B) {
			q := c.wrap(NewMemory())
			defer q.Close(context.Background())
			if err := q.Subscribe("items", func([]byte) {}, nil); err != nil {
				b.Fatal(err)
			}
			body := []byte(`{"entity":"items","id":"100"}`)
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if err := q.Publish(ctx, "items", body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
