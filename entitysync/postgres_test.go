package entitysync_test

import (
	"context"
	"fmt"
	"math/rand"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esq/pgq"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/pgtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// Postgres as the bus: the same scenarios as over NSQ, with every server's
// queue a pgq.Queue on one channel of the test's own.

// newPGQueue returns a queue on channel; the EntitySync it is given to
// closes it.
func newPGQueue(t *testing.T, channel string) *pgq.Queue {
	t.Helper()
	pgtest.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := pgq.New(ctx, pgq.Config{ConnString: pgtest.DSN(), Channel: channel, Logger: testkit.SilentLogger(),
		MinReconnectDelay: 20 * time.Millisecond, MaxReconnectDelay: 200 * time.Millisecond})
	if err != nil {
		t.Fatalf("pgq.New: %v", err)
	}
	return q
}

// Three servers over one Postgres: a change notified on one reaches the
// key's subscribers on every one, and nobody else.
func TestPostgresCluster(t *testing.T) {
	t.Parallel()
	ch := pgtest.Name(t, "es_chan_")
	store := testkit.NewStore()
	servers := startServers(t, 3, store, func(int) es.Config {
		return es.Config{Queue: newPGQueue(t, ch), Logger: testkit.Logger()}
	})
	checkBroadcast(t, servers, store)
}

// A write by another program (psql) reaches websocket clients on every
// server, through the table's trigger: nothing in Go notifies.
func TestPostgresTriggerReachesClients(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t)
	schema := pgtest.Schema(t, pool)
	ch := pgtest.Name(t, "es_chan_")
	pgtest.Exec(t, pool, "CREATE TABLE "+schema+".items (id text PRIMARY KEY, v int NOT NULL)")
	if err := pgq.ApplyTrigger(context.Background(), pool, pgq.Trigger{Schema: schema, Table: "items", Entity: "items", Channel: ch}); err != nil {
		t.Fatal(err)
	}
	pgtest.Exec(t, pool, "INSERT INTO "+schema+".items VALUES ('1', 1), ('2', 1)")
	// The rows in the test store's shape, read from the table.
	fetch := func(ctx context.Context, key shared.EntityKey) ([][]byte, error) {
		var row []byte
		err := pool.QueryRow(ctx, "SELECT json_build_object('entity', 'items', 'id', id, 'v', v)::text FROM "+schema+".items WHERE id = $1", key.ID).Scan(&row)
		if err != nil {
			return nil, err
		}
		return [][]byte{row}, nil
	}
	var clients []*testkit.WS
	for i := 0; i < 2; i++ {
		e, srv := testkit.Serve(t, es.Config{Queue: newPGQueue(t, ch), Logger: testkit.Logger()})
		if err := e.Register("items", fetch); err != nil {
			t.Fatal(err)
		}
		c := testkit.Dial(t, srv)
		c.Subscribe("items", "1")
		c.Await(wait, fmt.Sprintf("items/1 v1 on server %d", i), testkit.Is("items", "1", 1))
		clients = append(clients, c)
	}
	psql(t, pool, "UPDATE "+schema+".items SET v = 2 WHERE id = '1'")
	psql(t, pool, "BEGIN; UPDATE "+schema+".items SET v = 99 WHERE id = '1'; ROLLBACK;")
	psql(t, pool, "UPDATE "+schema+".items SET v = v + 1")
	for i, c := range clients {
		before := c.Await(wait, fmt.Sprintf("items/1 v3 on server %d", i), testkit.Is("items", "1", 3))
		for _, r := range before {
			if r.Version != 2 || r.Key() != key("items", "1") {
				t.Errorf("server %d: unexpected frame before v3: %s", i, r.Raw)
			}
		}
	}
}

// psql runs script with psql when it is installed (another program writing),
// else on the pool.
func psql(t *testing.T, pool *pgxpool.Pool, script string) {
	t.Helper()
	if path, err := exec.LookPath("psql"); err == nil {
		if out, err := exec.Command(path, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", pgtest.DSN(), "-c", script).CombinedOutput(); err != nil {
			t.Fatalf("psql -c %q: %v\n%s", script, err, out)
		}
		return
	}
	pgtest.Exec(t, pool, script)
}

// The burst of the NSQ convergence test over Postgres: 3 servers, 200
// clients on 10 of 100 keys each, 5,000 changes from 4 concurrent
// publishers. Every client must end on the final version of every key it
// holds, and every server must have received every notification.
func TestPostgresConvergence(t *testing.T) {
	runPostgresBurst(t, false)
}

// The same burst, with every server's listening backend killed with
// pg_terminate_backend once half the changes are published: every server
// must have resynced, and every client still converges.
func TestPostgresConvergenceListenersKilled(t *testing.T) {
	runPostgresBurst(t, true)
}

func runPostgresBurst(t *testing.T, kill bool) {
	b := fullBurst
	seed := burstSeed(t)
	rng := rand.New(rand.NewSource(seed))
	ch := pgtest.Name(t, "es_chan_")
	pool := pgtest.Pool(t)
	store := testkit.NewStore()

	servers := make([]server, b.servers)
	queues := make([]*pgq.Queue, b.servers)
	for i := range servers {
		queues[i] = newPGQueue(t, ch)
		e, srv := testkit.Serve(t, es.Config{Queue: queues[i], Logger: testkit.SilentLogger()})
		if err := e.Register("items", store.Fetch); err != nil {
			t.Fatal(err)
		}
		servers[i] = server{e, srv}
	}
	keys, clients, progress := subscribeBurst(t, rng, b, servers)

	var midway func()
	if kill {
		midway = func() {
			for i, q := range queues {
				pid := q.ListenerPID()
				if pid == 0 {
					t.Fatalf("server %d has no listener", i)
				}
				pgtest.Terminate(t, pool, pid)
			}
		}
	}
	res := publishAndConverge(t, b, seed, keys, servers, store, progress, clients, midway)
	burstTook, convergeTook := res.burstTook, res.convergeTook
	testkit.AwaitCond(t, 30*time.Second, func() (bool, string) {
		for i, s := range servers {
			st := s.es.Bridge.Stats()
			if kill && st.Resyncs == 0 {
				return false, fmt.Sprintf("server %d has not resynced", i)
			}
			if !kill && st.Received < uint64(b.changes) {
				return false, fmt.Sprintf("server %d received %d of %d notifications", i, st.Received, b.changes)
			}
		}
		return true, ""
	})
	if !kill {
		for i, s := range servers {
			if n := s.es.Bridge.Stats().Resyncs; n != 0 {
				t.Errorf("server %d resynced %d times with nothing lost", i, n)
			}
		}
	}
	for i, s := range servers {
		st := s.es.Bridge.Stats()
		t.Logf("server %d: received %d, fetches %d, deliveries %d, resyncs %d", i, st.Received, st.Fetches, st.Deliveries, st.Resyncs)
	}
	t.Logf("burst of %d changes published in %s (%d failed notifies retried); converged %s after the last publish",
		b.changes, burstTook.Round(time.Millisecond), res.failures, convergeTook.Round(time.Millisecond))
}

// The package entitysync does not depend on pgx nor on esq/pgq: only an
// application that imports esq/pgq builds them.
func TestNoPgxDependency(t *testing.T) {
	out, err := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, p := range strings.Fields(string(out)) {
		if strings.Contains(p, "github.com/jackc/") || strings.HasSuffix(p, "/esq/pgq") {
			t.Errorf("entitysync depends on %s", p)
		}
	}
}

// Notify -> client latency across two servers, over Postgres and, for
// comparison, over an embedded nsqd: the change is notified on one server,
// the client is on the other; one change at a time.
func BenchmarkNotifyToClient(b *testing.B) {
	for _, bus := range []string{"postgres", "nsq"} {
		b.Run(bus, func(b *testing.B) {
			cfg := func() es.Config { return es.Config{Logger: testkit.SilentLogger()} }
			switch bus {
			case "postgres":
				pgtest.Require(b)
				ch := pgtest.Name(b, "es_bench_")
				cfg = func() es.Config {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					defer cancel()
					q, err := pgq.New(ctx, pgq.Config{ConnString: pgtest.DSN(), Channel: ch, Logger: testkit.SilentLogger()})
					if err != nil {
						b.Fatal(err)
					}
					return es.Config{Queue: q, Logger: testkit.SilentLogger()}
				}
			case "nsq":
				nsqd := nsqtest.StartNSQD(b)
				cfg = func() es.Config { return es.Config{NSQAddr: nsqd.TCPAddr(), Logger: testkit.SilentLogger()} }
			}
			store := testkit.NewStore()
			var servers []*es.EntitySync
			var client *testkit.WS
			for i := 0; i < 2; i++ {
				e, srv := testkit.Serve(b, cfg())
				if err := e.Register("items", store.Fetch); err != nil {
					b.Fatal(err)
				}
				servers = append(servers, e)
				if i == 1 {
					client = testkit.Dial(b, srv)
				}
			}
			k := key("items", "1")
			client.Subscribe("items", "1")
			client.AwaitKeys(wait, k)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				v := store.Bump(k)
				if err := servers[0].NotifyAllOfChange(k); err != nil {
					b.Fatal(err)
				}
				client.Await(wait, fmt.Sprintf("v%d", v), testkit.Is("items", "1", v))
			}
		})
	}
}
