package esweb_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esweb"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// Guarantee 5 (isolation): a client that stops reading costs bounded memory,
// never delays the others, and is disconnected once a write to it has waited
// WriteWait.
func TestStuckClientIsDroppedAndOthersKeepUp(t *testing.T) {
	const (
		others     = 20
		rowSize    = 64 << 10
		changes    = 300
		writeWait  = 500 * time.Millisecond
		maxLatency = 2 * time.Second
		// HeapInuse after the run less before it, after a GC each time.
		// What the server legitimately holds at the end is the key's current
		// update (one row and its prepared frame, ~128 KiB) and the readers'
		// connection buffers; under -race the whole test process measured
		// 1.7 MiB in use before and after. The allowance is slack for the
		// race detector and the GC, and still well under what a server
		// that kept every update it could not write to the stuck client (or
		// leaked the dropped connection with its queue) would hold:
		// changes x 128 KiB = 37.5 MiB.
		heapAllowance = 16 << 20
	)
	big := shared.EntityKey{Entity: "items", ID: "big"}
	var version atomic.Int64
	fetch := func(_ context.Context, k shared.EntityKey) ([][]byte, error) {
		return [][]byte{bigRow(k, int(version.Load()), rowSize)}, nil
	}

	// SendBufferSize -1: the server leaves the sockets' buffers alone, and
	// the test makes only the stuck client's small (below).
	e, err := es.New(es.Config{Web: esweb.Options{WriteWait: writeWait, SendBufferSize: -1}, Logger: testkit.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Register("items", fetch); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(e.Mux)
	accepted := &trackingListener{Listener: srv.Listener, conns: make(map[string]*net.TCPConn)}
	srv.Listener = accepted
	srv.Start()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := e.Close(ctx); err != nil {
			t.Errorf("close: %v", err)
		}
		srv.Close()
	})

	// The stuck client subscribes and never reads. Small socket buffers on
	// both ends make the server's writes to it block after a few KiB rather
	// than after the megabytes loopback autotuning would allow.
	dialer := websocket.Dialer{NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err == nil {
			_ = c.(*net.TCPConn).SetReadBuffer(4 << 10)
		}
		return c, err
	}}
	stuck, _, err := dialer.Dial(testkit.WSURL(srv), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Close()
	serverSide := accepted.get(stuck.LocalAddr().String())
	if serverSide == nil {
		t.Fatalf("server side of %s not found", stuck.LocalAddr())
	}
	_ = serverSide.SetWriteBuffer(8 << 10)
	subscribedAt := time.Now()
	if err := stuck.WriteJSON(map[string]any{"action": "subscribe", "body": big}); err != nil {
		t.Fatal(err)
	}

	progress := testkit.NewProgress()
	readers := make([]*testkit.Tracker, others)
	for i := range readers {
		if readers[i] = testkit.DialTracker(t, srv, testkit.TrackerOptions{Progress: progress, Parse: parseBigRow}); readers[i] == nil {
			t.FailNow()
		}
		if err := readers[i].Subscribe(big); err != nil {
			t.Fatal(err)
		}
	}
	awaitReaders(t, progress, readers, big, 0, 10*time.Second)
	testkit.AwaitCond(t, 10*time.Second, func() (bool, string) {
		n := e.Bridge.Stats().Clients
		return n == others+1, fmt.Sprintf("%d bridge clients, want %d", n, others+1)
	})
	heapBefore := heapInuse()

	start := time.Now()
	var maxLat, sumLat time.Duration
	droppedAfter := -1
	for i := 1; i <= changes; i++ {
		v := int(version.Add(1))
		t0 := time.Now()
		if err := e.NotifyAllOfChange(big); err != nil {
			t.Fatal(err)
		}
		awaitReaders(t, progress, readers, big, v, maxLatency)
		lat := time.Since(t0)
		sumLat += lat
		maxLat = max(maxLat, lat)
		if droppedAfter < 0 && e.Web.Connections() == others {
			droppedAfter = i
			since := time.Since(subscribedAt)
			t.Logf("stuck client dropped by change %d, %s after it subscribed", i, since.Round(time.Millisecond))
			// Its first write (the initial state) cannot start before it
			// subscribed, so the write deadline cannot pass sooner: an
			// earlier drop would have another cause.
			if since < writeWait {
				t.Errorf("stuck client dropped %s after subscribing, before the %s write deadline could pass", since, writeWait)
			}
		}
	}
	took := time.Since(start)

	// The stuck client is gone from the transport and the bridge...
	testkit.AwaitCond(t, 10*time.Second, func() (bool, string) {
		c, b := e.Web.Connections(), e.Bridge.Stats().Clients
		return c == others && b == others, fmt.Sprintf("%d connections, %d bridge clients; want %d each", c, b, others)
	})
	// ...and the server closed its end of the socket. (Reading the stuck
	// client's end to EOF would prove it too, but the kernel then resumes
	// the transfer on its zero-window probe timer, seconds later.)
	if err := serverSide.SetReadBuffer(64 << 10); !errors.Is(err, net.ErrClosed) {
		t.Errorf("server's end of the stuck connection is still open (setsockopt: %v)", err)
	}

	for i, r := range readers {
		if bw := r.Backwards(); len(bw) > 0 {
			t.Errorf("reader %d: per-key order broken: %v", i, bw)
		}
		if f := r.Frames(big); f != changes+1 {
			t.Errorf("reader %d got %d frames, want %d (initial state and every change)", i, f, changes+1)
		}
		if err := r.CloseErr(); err != nil {
			t.Errorf("reader %d lost its connection: %v", i, err)
		}
	}

	heapAfter := heapInuse()
	growth := int64(heapAfter) - int64(heapBefore)
	t.Logf("%d changes of a %d KiB row to %d readers in %s; latency to reach all readers: mean %s, max %s",
		changes, rowSize>>10, others, took.Round(time.Millisecond),
		(sumLat / changes).Round(time.Microsecond), maxLat.Round(time.Microsecond))
	t.Logf("heap in use: %.1f MiB before, %.1f MiB after (%+.1f MiB, allowance %d MiB)",
		float64(heapBefore)/(1<<20), float64(heapAfter)/(1<<20), float64(growth)/(1<<20), heapAllowance>>20)
	if growth > heapAllowance {
		t.Errorf("heap grew by %.1f MiB, more than %d MiB", float64(growth)/(1<<20), heapAllowance>>20)
	}
	if droppedAfter < 0 {
		t.Log("stuck client dropped only after the last change")
	}
}

// bigRow renders a key's row at version v, padded to size bytes. The
// version comes first so readers can decode the head only.
func bigRow(k shared.EntityKey, v, size int) []byte {
	head := fmt.Sprintf(`{"entity":%q,"id":%q,"v":%d,"pad":"`, k.Entity, k.ID, v)
	pad := size - len(head) - 2
	return []byte(head + strings.Repeat("x", max(pad, 0)) + `"}`)
}

// parseBigRow decodes the head of a bigRow (the padding would cost a JSON
// scan of 64 KiB per frame per reader).
func parseBigRow(b []byte) testkit.Row {
	head := b
	if i := bytes.Index(b, []byte(`,"pad":`)); i >= 0 {
		head = append(b[:i:i], '}')
	}
	var r testkit.Row
	_ = json.Unmarshal(head, &r)
	return r
}

// awaitReaders waits until every reader holds k at version v or later and
// returns how long that took.
func awaitReaders(t *testing.T, progress *testkit.Progress, readers []*testkit.Tracker, k shared.EntityKey, v int, timeout time.Duration) time.Duration {
	t.Helper()
	next := 0
	return progress.Await(t, timeout, func() (bool, string) {
		for ; next < len(readers); next++ {
			if got, ok := readers[next].Latest(k); !ok || got < v {
				return false, fmt.Sprintf("reader %d has %s at v%d (any: %v), want v%d", next, k, got, ok, v)
			}
		}
		return true, ""
	})
}

func heapInuse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// trackingListener remembers the server side of every accepted connection
// by the client's address, so a test can tune one connection's socket.
type trackingListener struct {
	net.Listener
	mu    sync.Mutex
	conns map[string]*net.TCPConn
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		l.mu.Lock()
		l.conns[tc.RemoteAddr().String()] = tc
		l.mu.Unlock()
	}
	return c, err
}

func (l *trackingListener) get(remote string) *net.TCPConn {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.conns[remote]
}
