package esweb_test

import (
	"context"
	"fmt"
	"net"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esweb"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// WriteWait bounds a write that makes no progress, not a whole batch: a
// client reading steadily at 2 MB/s is sent 8 MiB of initial states at
// once, which takes it seconds, and stays connected; a client that stops
// reading is still dropped after WriteWait.
func TestSteadySlowReaderIsNotDropped(t *testing.T) {
	const (
		keys    = 32
		rowSize = 256 << 10 // 8 MiB in all, about 4 s at this rate
		rate    = 2e6       // bytes per second the steady reader takes
		// Long enough that a reader stalled by a loaded machine (the race
		// detector, other tests) is not taken for one that stopped.
		writeWait = 1500 * time.Millisecond
	)
	e, srv := serveBig(t, rowSize, nil, esweb.Options{WriteWait: writeWait, SendBufferSize: 64 << 10})

	// Small socket buffers on both ends, as on a slow link whose buffers
	// are full: what the client has not read waits in the server.
	dial := func(t *testing.T, paced float64) (*websocket.Conn, time.Time) {
		t.Helper()
		dialer := websocket.Dialer{NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			_ = c.(*net.TCPConn).SetReadBuffer(64 << 10)
			if paced > 0 {
				return &pacedConn{Conn: c, rate: paced, start: time.Now()}, nil
			}
			return c, nil
		}}
		c, _, err := dialer.Dial(testkit.WSURL(srv), nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		subscribed := time.Now()
		for i := 0; i < keys; i++ {
			if err := c.WriteJSON(map[string]any{"action": "subscribe", "body": shared.EntityKey{Entity: "big", ID: fmt.Sprint(i)}}); err != nil {
				t.Fatal(err)
			}
		}
		return c, subscribed
	}

	t.Run("steady", func(t *testing.T) {
		before := e.Web.Stats().SlowClients
		c, _ := dial(t, rate)
		start := time.Now()
		seen := make(map[string]bool)
		for len(seen) < keys {
			_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
			_, b, err := c.ReadMessage()
			if err != nil {
				t.Fatalf("steady reader lost its connection after %d of %d initial states (%s): %v",
					len(seen), keys, time.Since(start).Round(time.Millisecond), err)
			}
			seen[parseBigRow(b).ID] = true
		}
		took := time.Since(start)
		t.Logf("%d MiB read at %.0f MB/s in %s (WriteWait %s)", keys*rowSize>>20, rate/1e6, took.Round(time.Millisecond), writeWait)
		if took < 2*writeWait {
			t.Errorf("the states took %s, not several times WriteWait: the test did not make the server wait", took)
		}
		if n := e.Web.Stats().SlowClients - before; n != 0 {
			t.Errorf("%d connections dropped as slow", n)
		}
	})

	t.Run("stopped", func(t *testing.T) {
		before := e.Web.Stats().SlowClients
		_, subscribed := dial(t, 0) // never reads
		took := testkit.AwaitCond(t, 20*time.Second, func() (bool, string) {
			n := e.Web.Stats().SlowClients - before
			return n == 1, fmt.Sprintf("%d connections dropped as slow, want 1", n)
		})
		since := time.Since(subscribed)
		t.Logf("reader that stopped dropped %s after it subscribed", since.Round(time.Millisecond))
		if since < writeWait {
			t.Errorf("dropped %s after subscribing (waited %s), before WriteWait (%s) could pass", since, took, writeWait)
		}
	})
}

// serveBig serves entity type "big", whose rows are bigRows of size bytes
// at the version version holds (0 if nil).
func serveBig(t *testing.T, size int, version *atomic.Int64, web esweb.Options) (*es.EntitySync, *httptest.Server) {
	t.Helper()
	e, err := es.New(es.Config{Web: web, Logger: testkit.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Register("big", func(_ context.Context, k shared.EntityKey) ([][]byte, error) {
		v := 0
		if version != nil {
			v = int(version.Load())
		}
		return [][]byte{bigRow(k, v, size)}, nil
	}); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(e.Mux)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := e.Close(ctx); err != nil {
			t.Errorf("close: %v", err)
		}
		srv.Close()
	})
	return e, srv
}

// Latest-wins replaces a slow client's pending state of a key with the
// newest, but only while the state is still in the server's queue: frames
// the socket took are read, stale, before the newest. A client reading 30
// frames a second while its key changes 500 times a second gets the newest
// state within about a send buffer's worth of frames once the changes stop,
// not after the megabytes a send buffer autotuned on loopback holds.
func TestSlowReaderGetsNewestStateSoon(t *testing.T) {
	const (
		rowSize   = 16 << 10
		period    = 2 * time.Millisecond  // between changes
		changeFor = 2 * time.Second       // long enough to fill every buffer on the way
		readEvery = 33 * time.Millisecond // the reader's pace
		// The default send buffer (256 KiB as Linux counts it) holds about
		// 16 of these frames, the client's receive buffer (loopback's
		// initial 128 KiB) about 8, the flusher one more.
		maxStale = 48
	)
	var version atomic.Int64
	e, srv := serveBig(t, rowSize, &version, esweb.Options{})
	key := shared.EntityKey{Entity: "big", ID: "hot"}
	c, _, err := websocket.DefaultDialer.Dial(testkit.WSURL(srv), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	type read struct {
		at time.Time
		v  int
	}
	reads := make(chan read, 1<<16)
	go func() {
		defer close(reads)
		for {
			_, b, err := c.ReadMessage()
			if err != nil {
				return
			}
			reads <- read{time.Now(), parseBigRow(b).Version}
			time.Sleep(readEvery) // the reader's pace, not synchronisation
		}
	}()
	next := func() read {
		t.Helper()
		select {
		case r, ok := <-reads:
			if !ok {
				t.Fatal("connection lost")
			}
			return r
		case <-time.After(30 * time.Second):
			t.Fatal("no frame for 30 s")
		}
		panic("unreachable")
	}
	if err := c.WriteJSON(map[string]any{"action": "subscribe", "body": key}); err != nil {
		t.Fatal(err)
	}
	next() // the initial state: subscribed

	tick := time.NewTicker(period)
	for start := time.Now(); time.Since(start) < changeFor; {
		<-tick.C
		version.Add(1)
		if err := e.NotifyAllOfChange(key); err != nil {
			t.Fatal(err)
		}
	}
	tick.Stop()
	newest, stopped := int(version.Load()), time.Now()

	stale := 0
	for {
		r := next()
		if r.at.Before(stopped) {
			continue
		}
		if r.v == newest {
			t.Logf("after %d changes, %d stale frames read before the newest state, %s after the changes stopped",
				newest, stale, r.at.Sub(stopped).Round(time.Millisecond))
			break
		}
		stale++
	}
	if stale > maxStale {
		t.Errorf("%d stale frames read before the newest state, want at most %d", stale, maxStale)
	}
	if n := e.Web.Stats().SlowClients; n != 0 {
		t.Errorf("%d connections dropped as slow", n)
	}
}

// pacedConn is a client on a slow link that keeps reading: it takes at most
// rate bytes per second, in reads of at most 16 KiB.
type pacedConn struct {
	net.Conn
	rate  float64
	start time.Time
	read  atomic.Int64
}

func (p *pacedConn) Read(b []byte) (int, error) {
	if len(b) > 16<<10 {
		b = b[:16<<10]
	}
	// Pacing, not synchronisation: the next read is due once the bytes
	// read so far took their time at this rate.
	due := p.start.Add(time.Duration(float64(p.read.Load()) / p.rate * float64(time.Second)))
	time.Sleep(time.Until(due))
	n, err := p.Conn.Read(b)
	p.read.Add(int64(n))
	return n, err
}
