package esweb

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

// benchRow is a typical row as a database's JSON output has it (Postgres's
// jsonb::text puts a space after each colon and comma), about 120 bytes.
func benchRow(i, v int) []byte {
	return fmt.Appendf(nil, `{"id": "%d", "title": "milk & bread, 2 <l>", "done": false, "owner": "user-%d", "updated": %d}`, i, i%17, v)
}

// encodeBench holds states made by a real bridge: a plain key's and, for a
// collection key whose client takes diffs, a diff from the previous state.
type encodeBench struct {
	bridge *esbridge.Bridge
	n      int          // the collection's rows
	v      atomic.Int64 // the version of the collection's row 0
}

func newEncodeBench(b *testing.B, n int) *encodeBench {
	b.Helper()
	e := &encodeBench{n: n}
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	hub := esdb.NewDatabaseHub()
	fetch := func(context.Context, shared.EntityKey) ([][]byte, error) {
		rows := make([][]byte, e.n)
		for i := range rows {
			v := 0
			if i == e.n/2 {
				v = int(e.v.Load())
			}
			rows[i] = benchRow(i, v)
		}
		return rows, nil
	}
	if err := hub.Register("items", fetch); err != nil {
		b.Fatal(err)
	}
	if err := hub.RegisterCollection("lists", fetch, esdb.JSONField("id")); err != nil {
		b.Fatal(err)
	}
	e.bridge = esbridge.New(esq.NewMemory(), hub, esbridge.Options{Logger: log})
	for _, t := range []shared.EntityType{"items", "lists"} {
		if err := e.bridge.ServeEntity(t); err != nil {
			b.Fatal(err)
		}
	}
	b.Cleanup(func() { _ = e.bridge.Close(context.Background()) })
	return e
}

// take waits for c's next update.
func take(b *testing.B, c *esbridge.Client) *esbridge.Update {
	b.Helper()
	timeout := time.After(10 * time.Second)
	for {
		if batch := c.Take(nil); len(batch) > 0 {
			return batch[len(batch)-1]
		}
		select {
		case <-c.Ready():
		case <-timeout:
			b.Fatal("no update within 10s")
		}
	}
}

// state returns the plain key's state.
func (e *encodeBench) state(b *testing.B) *esbridge.Update {
	c := e.bridge.ClientBuilder(context.Background())
	b.Cleanup(c.Close)
	if err := c.Subscribe(shared.EntityKey{Entity: "items", ID: "1"}); err != nil {
		b.Fatal(err)
	}
	return take(b, c)
}

// diff returns a diff view: the collection's middle row changed.
func (e *encodeBench) diff(b *testing.B) *esbridge.Update {
	c := e.bridge.ClientBuilder(context.Background())
	b.Cleanup(c.Close)
	c.AcceptDiffs()
	key := shared.EntityKey{Entity: "lists", ID: "1"}
	if err := c.Subscribe(key); err != nil {
		b.Fatal(err)
	}
	take(b, c)
	e.v.Add(1)
	if err := e.bridge.NotifyAllOfChange(key); err != nil {
		b.Fatal(err)
	}
	u := take(b, c)
	if _, d := u.Diff(); d == nil || len(d.Upsert) != 1 {
		b.Fatalf("not a diff of one upsert: %+v", u)
	}
	return u
}

// BenchmarkEncodeFrames measures encoding one state into its frames, done
// once per change and server for all subscribers: a rows frame of 1 and of
// 100 rows, the raw dialect's frames of 100 rows, and a diff of one row of
// a 500-row collection (the full state it is compared with is encoded once,
// outside the loop).
func BenchmarkEncodeFrames(b *testing.B) {
	for _, n := range []int{1, 100} {
		b.Run(fmt.Sprintf("rows=%d", n), func(b *testing.B) {
			u := newEncodeBench(b, n).state(b)
			b.SetBytes(int64(len(encodeState(u))))
			b.ReportAllocs()
			for range b.N {
				encodeState(u)
			}
		})
	}
	b.Run("raw/rows=100", func(b *testing.B) {
		u := newEncodeBench(b, 100).state(b)
		b.SetBytes(int64(len(prepareRaw(u).([]byte))))
		b.ReportAllocs()
		for range b.N {
			prepareRaw(u)
		}
	})
	b.Run("diff/1of500", func(b *testing.B) {
		u := newEncodeBench(b, 500).diff(b)
		b.SetBytes(int64(len(prepareEnvelope(u).([]byte))))
		b.ReportAllocs()
		for range b.N {
			prepareEnvelope(u)
		}
	})
}
