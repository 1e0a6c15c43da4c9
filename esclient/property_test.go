package esclient_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http/httptest"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esclient"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/esweb"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// The property: random inserts, updates, deletes and moves in
// collections, Go clients reading at random speeds (some slow enough that
// the server's latest-wins queue replaces states they never got) and
// reconnecting at random (resuming with the version they hold); once the
// writes stop, every client's rows equal the fetch result, and the changes
// it was handed, applied in order, give the same rows.
//
// ES_PROP_SEED=<n> replays a run; the seed is printed when the test fails.
func TestCollectionProperty(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("ES_PROP_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("ES_PROP_SEED: %v", err)
		}
		seed = n
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("seed %d: rerun with ES_PROP_SEED=%d", seed, seed)
		}
	})
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	const (
		nClients = 8
		maxLen   = 40
		writeFor = 1500 * time.Millisecond
	)
	lists := []string{"a", "b"}

	store := testkit.NewCollection()
	for _, l := range lists {
		store.Fill(l, 20, 40)
	}
	// Small send buffers on the server's sockets: a slow reader makes its
	// writes block after a few KiB, so states wait in the server's
	// latest-wins queue and newer ones replace them.
	e, err := entitysync.New(entitysync.Config{Web: esweb.Options{SendBufferSize: 4 << 10}, Logger: testkit.SilentLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.RegisterCollection("lists", store.Fetch, esdb.JSONField("id")); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(e.Mux)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		if err := e.Close(ctx); err != nil {
			t.Errorf("close: %v", err)
		}
		srv.Close()
	})
	url := wsURL(srv.URL)
	progress := testkit.NewProgress()

	clients := make([]*propClient, nClients)
	for i := range clients {
		pc := &propClient{id: i, held: make(map[string]*model), progress: progress}
		// Speeds: some read as fast as they can, some pause a little per
		// read, some are slow: small reads and a small TCP window, so the
		// server's writes to them block and states pile up in its queue.
		switch i % 3 {
		case 1:
			pc.pause = time.Duration(r.IntN(300)) * time.Microsecond
		case 2:
			pc.pause, pc.small = time.Duration(1+r.IntN(4))*time.Millisecond, true
		}
		pc.rng = rand.New(rand.NewPCG(seed, uint64(i)))
		c, err := esclient.New(url, fast(esclient.Options{Dialer: pc.dialer()}))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		pc.c = c
		for _, l := range lists {
			m := &model{rows: map[string]string{}}
			pc.held[l] = m
			if _, err := c.SubscribeWith(key("lists", l), esclient.Handlers{
				Changes: func(s esclient.Snapshot) { pc.apply(t, m, s) },
				Error:   func(err error) { t.Errorf("client %d: %v", i, err) },
			}); err != nil {
				t.Fatal(err)
			}
		}
		clients[i] = pc
	}

	// Writes and reconnects at random, then quiet.
	ctx, stop := context.WithTimeout(context.Background(), writeFor)
	defer stop()
	var wg sync.WaitGroup
	var writes atomic.Int64
	for w := 0; w < 2; w++ {
		wr := rand.New(rand.NewPCG(seed, uint64(100+w)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				l := lists[wr.IntN(len(lists))]
				store.Random(l, wr, maxLen)
				var err error
				if wr.IntN(4) == 0 { // sometimes both lists in one call
					store.Random(lists[0], wr, maxLen)
					err = e.NotifyKeys(key("lists", lists[0]), key("lists", l))
				} else {
					err = e.NotifyAllOfChange(key("lists", l))
				}
				if err != nil {
					t.Errorf("notify: %v", err)
					return
				}
				writes.Add(1)
				time.Sleep(time.Duration(wr.IntN(3000)) * time.Microsecond) // the writers' pace, not synchronisation
			}
		}()
	}
	for _, pc := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				pause := time.NewTimer(time.Duration(50+pc.rng.IntN(400)) * time.Millisecond)
				select {
				case <-ctx.Done():
					pause.Stop()
					return
				case <-pause.C:
				}
				pc.cut()
			}
		}()
	}
	wg.Wait()

	status := func() (bool, string) {
		for _, l := range lists {
			want := store.Rows(l)
			for _, pc := range clients {
				if ok, why := pc.holds(l, want); !ok {
					return false, fmt.Sprintf("client %d (pause %s, small %v), list %s: %s", pc.id, pc.pause, pc.small, l, why)
				}
			}
		}
		return true, ""
	}
	took := progress.Await(t, 20*time.Second, status)
	var cuts, states int64
	for _, pc := range clients {
		cuts += pc.cuts.Load()
		states += pc.states.Load()
		// The client recovers from a diff it cannot apply by subscribing
		// again, which would hide a server that diffs from the wrong base:
		// with no unsubscribes, there must be none.
		if n := esclient.Resyncs(pc.c); n > 0 {
			t.Errorf("client %d (pause %s, small %v) was sent %d states it could not apply", pc.id, pc.pause, pc.small, n)
		}
	}
	t.Logf("seed %d: %d writes, %d reconnects forced, %d states handed to %d clients; converged %s after the writes stopped",
		seed, writes.Load(), cuts, states, nClients, took.Round(time.Millisecond))
}

// propClient is one client of the property test and what it was handed.
type propClient struct {
	id       int
	c        *esclient.Client
	rng      *rand.Rand
	pause    time.Duration // slept before each read of the socket
	small    bool          // 128-byte reads and a small TCP receive buffer
	progress *testkit.Progress

	mu   sync.Mutex
	conn net.Conn // the current connection, for cut
	held map[string]*model

	cuts, states atomic.Int64
}

// model is what a client's application knows of one list: the last
// snapshot's rows, and the rows by id as the changes made them.
type model struct {
	last    esclient.Snapshot
	has     bool
	rows    map[string]string
	problem string
}

// apply runs on the client's callback goroutine.
func (pc *propClient) apply(t *testing.T, m *model, s esclient.Snapshot) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.states.Add(1)
	for _, c := range s.Changes {
		_, had := m.rows[c.ID]
		switch {
		case c.Type == esclient.Removed && had:
			delete(m.rows, c.ID)
		case c.Type == esclient.Added && !had, c.Type == esclient.Modified && had:
			m.rows[c.ID] = string(c.Row)
		default:
			if m.problem == "" {
				m.problem = fmt.Sprintf("change %s of %s that the changes so far do not allow", c.Type, c.ID)
			}
		}
	}
	m.last, m.has = s, true
	pc.progress.Signal()
}

// holds reports whether the client holds want for list, by its last
// snapshot and by the changes it was handed.
func (pc *propClient) holds(list string, want [][]byte) (bool, string) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	m := pc.held[list]
	switch {
	case m.problem != "":
		return false, m.problem
	case !m.has:
		return false, "no state yet"
	case len(m.last.Rows) != len(want):
		return false, fmt.Sprintf("%d rows, want %d", len(m.last.Rows), len(want))
	case m.last.Version != shared.Version(want):
		return false, fmt.Sprintf("version %s, want %s", m.last.Version, shared.Version(want))
	case len(m.rows) != len(want):
		return false, fmt.Sprintf("the changes give %d rows, want %d", len(m.rows), len(want))
	}
	for i, row := range want {
		if !bytes.Equal(m.last.Rows[i], row) {
			return false, fmt.Sprintf("row %d is %s, want %s", i, m.last.Rows[i], row)
		}
		var id struct{ ID string }
		_ = json.Unmarshal(row, &id)
		if m.rows[id.ID] != string(row) || m.last.IDs[i] != id.ID {
			return false, fmt.Sprintf("the changes give %s for %s, want %s", m.rows[id.ID], id.ID, row)
		}
	}
	return true, ""
}

// dialer returns the client's dialer: it keeps the connection for cut and
// makes reads as slow as the client is.
func (pc *propClient) dialer() *websocket.Dialer {
	d := &websocket.Dialer{NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		if pc.small {
			_ = c.(*net.TCPConn).SetReadBuffer(4096)
		}
		pc.mu.Lock()
		pc.conn = c
		pc.mu.Unlock()
		return &slowConn{Conn: c, pause: pc.pause}, nil
	}}
	if pc.small {
		d.ReadBufferSize = 128
	}
	return d
}

// cut drops the client's connection, as a network failure would.
func (pc *propClient) cut() {
	pc.mu.Lock()
	c := pc.conn
	pc.mu.Unlock()
	if c != nil {
		pc.cuts.Add(1)
		c.Close()
	}
}

type slowConn struct {
	net.Conn
	pause time.Duration
}

func (c *slowConn) Read(b []byte) (int, error) {
	if c.pause > 0 {
		time.Sleep(c.pause) // the reader's speed, not synchronisation
	}
	return c.Conn.Read(b)
}
