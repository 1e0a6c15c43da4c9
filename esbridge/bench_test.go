package esbridge_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/internal/childproc"
	"github.com/entity-sync/entity-sync/shared"
)

// benchEntity is the entity type every benchmark serves.
const benchEntity shared.EntityType = "bench"

// flipFetcher returns one of two fixed rows, alternating on every call, so
// that each fetch differs from the previous one (the bridge sends nothing
// when a fetch returns the rows clients already have). It allocates nothing.
type flipFetcher struct {
	n    atomic.Uint64
	rows [2][][]byte
}

func newFlipFetcher() *flipFetcher {
	f := &flipFetcher{}
	f.rows[0] = [][]byte{[]byte(`{"id":"1","name":"widget","price":100}`)}
	f.rows[1] = [][]byte{[]byte(`{"id":"1","name":"widget","price":101}`)}
	return f
}

func (f *flipFetcher) Fetch(context.Context, shared.EntityKey, string) ([][]byte, error) {
	return f.rows[f.n.Add(1)%2], nil
}

func (*flipFetcher) PerSecret(shared.EntityType) bool { return false }

// newBenchBridge returns a bridge over the in-process queue serving
// benchEntity, closed when the benchmark ends.
func newBenchBridge(b *testing.B) *esbridge.Bridge {
	b.Helper()
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	br := esbridge.New(esq.NewMemory(), newFlipFetcher(), esbridge.Options{Logger: log})
	if err := br.ServeEntity(benchEntity); err != nil {
		b.Fatalf("ServeEntity: %v", err)
	}
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := br.Close(ctx); err != nil {
			b.Errorf("Close: %v", err)
		}
	})
	return br
}

// awaitSeq blocks until c has been handed an update for key with Seq >= want
// and returns the newest Seq seen. It fails the benchmark after a generous
// timeout rather than hanging.
func awaitSeq(b *testing.B, c *esbridge.Client, key shared.EntityKey, want uint64, buf []*esbridge.Update) ([]*esbridge.Update, uint64) {
	var got uint64
	var timeout <-chan time.Time
	for {
		buf = c.Take(buf[:0])
		for _, u := range buf {
			if u.Key == key && u.Seq > got {
				got = u.Seq
			}
		}
		clear(buf)
		if got >= want {
			return buf, got
		}
		if timeout == nil {
			timeout = time.After(10 * time.Second)
		}
		select {
		case <-c.Ready():
		case <-timeout:
			b.Fatalf("client did not receive seq %d of %s within 10s (last %d)", want, key, got)
		}
	}
}

// BenchmarkSubscribeUnsubscribe measures the subscription index: parallel
// clients each subscribe to a key and unsubscribe again, over 1,024 keys
// shared by all clients. A subscribe also starts the fetch round that sends
// the key's initial state, which is part of its cost.
func BenchmarkSubscribeUnsubscribe(b *testing.B) {
	br := newBenchBridge(b)
	keys := make([]shared.EntityKey, 1024)
	for i := range keys {
		keys[i] = shared.EntityKey{Entity: benchEntity, ID: strconv.Itoa(i)}
	}
	var next atomic.Uint64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		c := br.ClientBuilder(context.Background())
		defer c.Close()
		i := next.Add(1) * 7919 // spread goroutines over the keys
		for pb.Next() {
			key := keys[i%uint64(len(keys))]
			i++
			if err := c.Subscribe(key); err != nil {
				b.Errorf("Subscribe: %v", err)
				return
			}
			c.Unsubscribe(key)
		}
	})
}

// BenchmarkFanOut measures one change reaching every subscriber of a key:
// one notification per iteration (in-process queue), one fetch, and the
// update taken from every client's outbound queue. ns/delivery is ns/op
// divided by the number of subscribers.
func BenchmarkFanOut(b *testing.B) {
	for _, n := range []int{1, 100, 1000} {
		b.Run("subs="+strconv.Itoa(n), func(b *testing.B) {
			br := newBenchBridge(b)
			key := shared.EntityKey{Entity: benchEntity, ID: "hot"}
			clients := make([]*esbridge.Client, n)
			for i := range clients {
				clients[i] = br.ClientBuilder(context.Background())
				b.Cleanup(clients[i].Close)
				if err := clients[i].Subscribe(key); err != nil {
					b.Fatalf("Subscribe: %v", err)
				}
			}
			// Wait for every client's initial state. Each change then waits
			// for a Seq newer than the one the client last had: a
			// notification always causes a round that starts after it, so
			// that newer Seq always comes.
			var buf []*esbridge.Update
			last := make([]uint64, n)
			for i, c := range clients {
				buf, last[i] = awaitSeq(b, c, key, 1, buf)
			}
			fetches := br.Stats().Fetches

			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if err := br.NotifyAllOfChange(key); err != nil {
					b.Fatalf("NotifyAllOfChange: %v", err)
				}
				for i, c := range clients {
					buf, last[i] = awaitSeq(b, c, key, last[i]+1, buf)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/delivery")
			b.ReportMetric(float64(br.Stats().Fetches-fetches)/float64(b.N), "fetches/op")
		})
	}
}

// flipCollection is flipFetcher for a collection: 500 rows of about 100
// bytes, of which one changes on every fetch.
type flipCollection struct {
	n    atomic.Uint64
	rows [2][][]byte
}

func newFlipCollection() *flipCollection {
	f := &flipCollection{}
	for v := range f.rows {
		for i := range 500 {
			rev := 0
			if i == 250 {
				rev = v // the row that changes
			}
			row := fmt.Sprintf(`{"id":"item-%d","title":"task %04d: %s","rev":%d}`, i, i, strings.Repeat("x", 40), rev)
			f.rows[v] = append(f.rows[v], []byte(row))
		}
	}
	return f
}

func (f *flipCollection) Fetch(context.Context, shared.EntityKey, string) ([][]byte, error) {
	return f.rows[f.n.Add(1)%2], nil
}

func (*flipCollection) PerSecret(shared.EntityType) bool { return false }

func (*flipCollection) RowID(shared.EntityType) esdb.RowID { return esdb.JSONField("id") }

// BenchmarkCollectionFanOut is BenchmarkFanOut for a 500-row collection
// whose changes touch one row, with clients that take diffs (as envelope
// connections do) and clients that take full states: what the diff path
// adds per delivery (the diff itself is made once per change, before the
// fan-out), and what a change costs the bridge (ids, version, diff).
func BenchmarkCollectionFanOut(b *testing.B) {
	for _, diffs := range []bool{false, true} {
		b.Run(fmt.Sprintf("subs=1000/diffs=%v", diffs), func(b *testing.B) {
			const n = 1000
			log := logrus.New()
			log.SetLevel(logrus.WarnLevel)
			br := esbridge.New(esq.NewMemory(), newFlipCollection(), esbridge.Options{Logger: log})
			if err := br.ServeEntity(benchEntity); err != nil {
				b.Fatalf("ServeEntity: %v", err)
			}
			b.Cleanup(func() { _ = br.Close(context.Background()) })
			key := shared.EntityKey{Entity: benchEntity, ID: "list"}
			clients := make([]*esbridge.Client, n)
			for i := range clients {
				clients[i] = br.ClientBuilder(context.Background())
				if diffs {
					clients[i].AcceptDiffs()
				}
				b.Cleanup(clients[i].Close)
				if err := clients[i].Subscribe(key); err != nil {
					b.Fatalf("Subscribe: %v", err)
				}
			}
			var buf []*esbridge.Update
			last := make([]uint64, n)
			for i, c := range clients {
				buf, last[i] = awaitSeq(b, c, key, 1, buf)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if err := br.NotifyAllOfChange(key); err != nil {
					b.Fatalf("NotifyAllOfChange: %v", err)
				}
				for i, c := range clients {
					buf, last[i] = awaitSeq(b, c, key, last[i]+1, buf)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/delivery")
		})
	}
}

// BenchmarkChange measures the whole per-change path of a key with few
// subscribers, as a transport with direct writes sees it: NotifyAllOfChange
// on the in-process queue, the notification's decode, the fetch round on a
// worker, the state encoded once (Memo, as esweb does) and handed to each
// client's direct writer. An iteration ends when the last subscriber has
// been handed the change, so ns/op is the change's latency on an idle
// machine and allocs/op its allocations.
func BenchmarkChange(b *testing.B) {
	for _, n := range []int{1, 5, 20} {
		b.Run("subs="+strconv.Itoa(n), func(b *testing.B) {
			br := newBenchBridge(b)
			key := shared.EntityKey{Entity: benchEntity, ID: "doc"}
			var handed atomic.Int64
			done := make(chan struct{}, 1)
			var target atomic.Int64
			type encodeID struct{}
			for range n {
				c := br.ClientBuilder(context.Background())
				b.Cleanup(c.Close)
				c.SetDirect(func(u *esbridge.Update) bool {
					// The transport's encode-once: the first writer of an
					// update builds its frame, the others reuse it.
					_ = u.Memo(encodeID{}, func(u *esbridge.Update) any {
						frame := make([]byte, 0, 64)
						for _, r := range u.Rows {
							frame = append(frame, r...)
						}
						return frame
					})
					if handed.Add(1) >= target.Load() {
						select {
						case done <- struct{}{}:
						default:
						}
					}
					return true
				})
				if err := c.Subscribe(key); err != nil {
					b.Fatalf("Subscribe: %v", err)
				}
			}
			timeout := time.NewTimer(time.Hour)
			defer timeout.Stop()
			await := func(want int64) {
				// A signal may be stale (a previous wait returned without
				// taking it): check the count after each.
				// One timer for all waits: the harness allocates nothing
				// per change.
				target.Store(want)
				if handed.Load() < want {
					timeout.Reset(10 * time.Second)
				}
				for handed.Load() < want {
					select {
					case <-done:
					case <-timeout.C:
						b.Fatalf("%d of %d deliveries within 10s", handed.Load(), want)
					}
				}
			}
			await(int64(n)) // the initial states
			fetches := br.Stats().Fetches
			b.ReportAllocs()
			b.ResetTimer()
			cpu := childproc.CPUNanos()
			for i := range b.N {
				if err := br.NotifyAllOfChange(key); err != nil {
					b.Fatalf("NotifyAllOfChange: %v", err)
				}
				await(int64(n) * int64(i+2))
			}
			b.StopTimer()
			// The process's CPU time per change: unlike ns/op it does not
			// count the time the machine's other work kept this one waiting.
			b.ReportMetric(float64(childproc.CPUNanos()-cpu)/float64(b.N), "cpu-ns/op")
			b.ReportMetric(float64(br.Stats().Fetches-fetches)/float64(b.N), "fetches/op")
		})
	}
}

// BenchmarkPacedKey runs one key with 1,000 subscribers whose deliveries
// take about 4 µs each (a fan-out split over 2 cores of about 2 ms),
// notified 200 times a second: the workers keep up, so no round should
// wait. It reports the latency
// from a round's first notification to its last delivery (p50, p99) and the
// share of changes that got a round of their own (states/change). Run it
// with -benchtime=400x: an iteration is one change, 5 ms apart on average.
func BenchmarkPacedKey(b *testing.B) {
	const n, every, work = 1000, 5 * time.Millisecond, 4 * time.Microsecond
	var (
		mu        sync.Mutex
		latencies []time.Duration
		rounds    int
		last      time.Time // when the last notification was published
	)
	ended := make(chan struct{}, 1) // a round started after last ended
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	key := shared.EntityKey{Entity: benchEntity, ID: "hot"}
	br := esbridge.New(esq.NewMemory(), newFlipFetcher(), esbridge.Options{Logger: log, OnRound: func(r esbridge.Round) {
		if r.Notified.IsZero() {
			return
		}
		mu.Lock()
		latencies = append(latencies, r.Delivered.Sub(r.Notified))
		rounds++
		if !last.IsZero() && r.Started.After(last) {
			select {
			case ended <- struct{}{}:
			default:
			}
		}
		mu.Unlock()
	}})
	if err := br.ServeEntity(benchEntity); err != nil {
		b.Fatalf("ServeEntity: %v", err)
	}
	b.Cleanup(func() { _ = br.Close(context.Background()) })
	var handed atomic.Int64
	initial := make(chan struct{})
	for range n {
		c := br.ClientBuilder(context.Background())
		b.Cleanup(c.Close)
		c.SetDirect(func(*esbridge.Update) bool {
			for start := time.Now(); time.Since(start) < work; {
			}
			if handed.Add(1) == n {
				close(initial)
			}
			return true
		})
		if err := c.Subscribe(key); err != nil {
			b.Fatalf("Subscribe: %v", err)
		}
	}
	<-initial
	// Changes arrive at random (exponential gaps averaging every, from a
	// fixed seed), as writes from many users do: some land during a
	// fan-out although the workers keep up.
	rng := rand.New(rand.NewPCG(1, 2))
	next := time.Now()
	wait := time.NewTimer(time.Hour)
	defer wait.Stop()
	b.ResetTimer()
	for i := range b.N {
		next = next.Add(time.Duration(rng.ExpFloat64() * float64(every)))
		wait.Reset(time.Until(next))
		<-wait.C
		if err := br.NotifyAllOfChange(key); err != nil {
			b.Fatalf("NotifyAllOfChange: %v", err)
		}
		if i == b.N-1 {
			mu.Lock()
			last = time.Now()
			mu.Unlock()
		}
	}
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		b.Fatal("the last change's round did not end within 10s")
	}
	b.StopTimer()
	mu.Lock()
	defer mu.Unlock()
	slices.Sort(latencies)
	q := func(p float64) float64 { return float64(latencies[int(p*float64(len(latencies)-1))].Microseconds()) }
	b.ReportMetric(q(0.5), "p50-µs")
	b.ReportMetric(q(0.99), "p99-µs")
	b.ReportMetric(float64(rounds)/float64(b.N), "states/change")
}

// BenchmarkFanOutWrites is BenchmarkChange for bigger groups whose direct
// writers each make a write system call (to /dev/null), as esweb's do to
// their sockets: what splitting a fan-out between cores gains (ns/op is
// the time until the last member has its frame) and costs (cpu-ns/op).
func BenchmarkFanOutWrites(b *testing.B) {
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer devNull.Close()
	frame := make([]byte, 128)
	for _, n := range []int{32, 64, 200} {
		b.Run("subs="+strconv.Itoa(n), func(b *testing.B) {
			br := newBenchBridge(b)
			key := shared.EntityKey{Entity: benchEntity, ID: "doc"}
			var handed atomic.Int64
			done := make(chan struct{}, 1)
			var target atomic.Int64
			for range n {
				c := br.ClientBuilder(context.Background())
				b.Cleanup(c.Close)
				c.SetDirect(func(*esbridge.Update) bool {
					if _, err := devNull.Write(frame); err != nil {
						b.Error(err)
					}
					if handed.Add(1) >= target.Load() {
						select {
						case done <- struct{}{}:
						default:
						}
					}
					return true
				})
				if err := c.Subscribe(key); err != nil {
					b.Fatalf("Subscribe: %v", err)
				}
			}
			await := func(want int64) {
				target.Store(want)
				for handed.Load() < want {
					select {
					case <-done:
					case <-time.After(10 * time.Second):
						b.Fatalf("%d of %d deliveries within 10s", handed.Load(), want)
					}
				}
			}
			await(int64(n))
			b.ReportAllocs()
			b.ResetTimer()
			cpu := childproc.CPUNanos()
			for i := range b.N {
				if err := br.NotifyAllOfChange(key); err != nil {
					b.Fatalf("NotifyAllOfChange: %v", err)
				}
				await(int64(n) * int64(i+2))
			}
			b.StopTimer()
			b.ReportMetric(float64(childproc.CPUNanos()-cpu)/float64(b.N), "cpu-ns/op")
		})
	}
}
