package esq

import (
	"context"
	"fmt"
	"runtime"
	"testing"
	"time"

	logtest "github.com/sirupsen/logrus/hooks/test"
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

// Publish and delivery through the in-process queue, without and with the
// loss detector (which DetectLoss does not put on that queue, since it
// cannot lose: the detector is built directly): the difference is what loss
// detection adds per message, sequence bookkeeping and the marks' timer
// included.
func BenchmarkMemoryPublish(b *testing.B) {
	for _, c := range []struct {
		name string
		wrap func(Queue) Queue
	}{
		{"plain", func(q Queue) Queue { return q }},
		{"DetectLoss", func(q Queue) Queue { return newLossDetector(q, defaultLossTiming) }},
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

// The heap a subscription keeps after 200,000 messages, each from a
// different (forged) publisher id, as anyone who can publish on the broker
// can send: reported as heap-MB, with the publishers remembered.
func BenchmarkLossForgedPublishers(b *testing.B) {
	const forged = 200_000
	bodies := make([][]byte, forged)
	for i := range bodies {
		bodies[i] = stamp([]byte(`{"entity":"items","id":"1"}`), 26, fmt.Sprintf("forged-%016x", i), 7)
	}
	l, _ := logtest.NewNullLogger()
	for b.Loop() {
		d := newLossDetector(newFakeBroker(), defaultLossTiming)
		d.log = l
		s := &seqSub{d: d, entity: "items", onMessage: func([]byte) {}, onLoss: func() {},
			peers: make(map[string]*seqPeer), lastSweep: time.Now(), since: time.Now()}
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		for _, body := range bodies {
			s.handle(body)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		s.mu.Lock()
		peers := len(s.peers)
		s.mu.Unlock()
		b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/1e6, "heap-MB")
		b.ReportMetric(float64(peers), "publishers")
		runtime.KeepAlive(s)
		d.Close(context.Background())
	}
}
