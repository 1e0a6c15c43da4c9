package entitysync_test

import (
	"bufio"
	"context"
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esq/natsq"
	"github.com/entity-sync/entity-sync/esq/redisq"
	"github.com/entity-sync/entity-sync/internal/testkit"
)

// The burst scenario of convergence_test.go (3 servers, 200 clients, 100
// keys, 5,000 changes from 4 publishers) on the NATS and Redis queues,
// passed to entitysync as Config.Queue, each on a broker of its own that the
// restart variant stops and starts again once half of the changes are
// published. convergence_test.go runs the same scenario on NSQ.

// queueBroker is a broker the scenario can stop and start, and how to make
// one server's queue on it.
type queueBroker struct {
	newQueue func(t testing.TB) esq.Queue
	// newRouted makes a queue that routes by key (RouteByKey).
	newRouted   func(t testing.TB) esq.Queue
	stop, start func() error
}

func TestConvergenceUnderBurstNATS(t *testing.T) {
	runQueueBurst(t, fullBurst, natsBroker(t))
}

func TestConvergenceAcrossNATSRestart(t *testing.T) {
	b := fullBurst
	b.restart = true
	runQueueBurst(t, b, natsBroker(t))
}

func TestConvergenceUnderBurstRedis(t *testing.T) {
	runQueueBurst(t, fullBurst, redisBroker(t))
}

func TestConvergenceAcrossRedisRestart(t *testing.T) {
	b := fullBurst
	b.restart = true
	runQueueBurst(t, b, redisBroker(t))
}

func runQueueBurst(t *testing.T, b burst, qb queueBroker) {
	seed := burstSeed(t)
	rng := rand.New(rand.NewSource(seed))
	store := testkit.NewStore()

	logger := testkit.Logger()
	if b.restart {
		logger = testkit.SilentLogger() // connection errors by the hundred, expected
	}
	servers := make([]server, b.servers)
	for i := range servers {
		e, srv := testkit.Serve(t, es.Config{Queue: qb.newQueue(t), Logger: logger})
		if err := e.Register("items", store.Fetch); err != nil {
			t.Fatalf("server %d: register: %v", i, err)
		}
		servers[i] = server{e, srv}
	}

	start := time.Now()
	keys, clients, progress := subscribeBurst(t, rng, b, servers)
	t.Logf("%d clients subscribed to %d keys each on %d servers; all initial states in %s",
		b.clients, b.keysPerClient, b.servers, time.Since(start).Round(time.Millisecond))
	checkOrder(t, clients)

	// The burst, with the broker stopped and started again at half of it.
	var midway func()
	if b.restart {
		midway = func() {
			if err := qb.stop(); err != nil {
				t.Fatal(err)
			}
			if err := qb.start(); err != nil {
				t.Fatal(err)
			}
		}
	}
	res := publishAndConverge(t, b, seed, keys, servers, store, progress, clients, midway)
	burstTook, convergeTook := res.burstTook, res.convergeTook

	if b.restart {
		// Every server's subscriber connection dropped: each must have
		// re-fetched its keys once its subscription was live again.
		testkit.AwaitCond(t, 30*time.Second, func() (bool, string) {
			for i, s := range servers {
				if s.es.Bridge.Stats().Resyncs == 0 {
					return false, fmt.Sprintf("server %d has not resynced", i)
				}
			}
			return true, ""
		})
	} else {
		// Nothing lost: every server receives every notification.
		testkit.AwaitCond(t, 30*time.Second, func() (bool, string) {
			for i, s := range servers {
				if n := s.es.Bridge.Stats().Received; n < uint64(b.changes) {
					return false, fmt.Sprintf("server %d received %d of %d notifications", i, n, b.changes)
				}
			}
			return true, ""
		})
		for i, s := range servers {
			if n := s.es.Bridge.Stats().Resyncs; n != 0 {
				t.Errorf("server %d resynced %d times with no broker loss", i, n)
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

// natsBroker is an embedded nats-server on a random 127.0.0.1 port.
func natsBroker(t *testing.T) queueBroker {
	port := natsserver.RANDOM_PORT
	var mu sync.Mutex
	var srv *natsserver.Server
	start := func() error {
		deadline := time.Now().Add(10 * time.Second)
		for {
			s, err := natsserver.NewServer(&natsserver.Options{Host: "127.0.0.1", Port: port, NoLog: true, NoSigs: true})
			if err != nil {
				return err
			}
			s.Start()
			if s.ReadyForConnections(5 * time.Second) {
				mu.Lock()
				srv, port = s, s.Addr().(*net.TCPAddr).Port
				mu.Unlock()
				return nil
			}
			s.Shutdown()
			if time.Now().After(deadline) {
				return fmt.Errorf("nats-server not ready on port %d", port)
			}
			time.Sleep(20 * time.Millisecond) // waiting on the kernel to free the port: no event to await
		}
	}
	stop := func() error {
		mu.Lock()
		s := srv
		srv = nil
		mu.Unlock()
		if s != nil {
			s.Shutdown()
			s.WaitForShutdown()
		}
		return nil
	}
	if err := start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stop() })
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	mk := func(route bool) func(t testing.TB) esq.Queue {
		return func(t testing.TB) esq.Queue {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			q, err := natsq.New(ctx, natsq.Config{URL: url, SubjectPrefix: "es.", ReconnectWait: 100 * time.Millisecond, Logger: testkit.SilentLogger(), RouteByKey: route})
			if err != nil {
				t.Fatal(err)
			}
			return q
		}
	}
	return queueBroker{newQueue: mk(false), newRouted: mk(true), stop: stop, start: start}
}

// redisBroker is a redis-server child process on a random 127.0.0.1 port.
func redisBroker(t *testing.T) queueBroker {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("redis-server is not installed (.ci/run installs it)")
		}
		t.Skip("redis-server is not installed (apt-get install redis-server)")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	addr := "127.0.0.1:" + strconv.Itoa(port)
	dir := t.TempDir()
	var mu sync.Mutex
	var cmd *exec.Cmd
	var exited chan struct{}
	start := func() error {
		c := exec.Command(bin, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir)
		if err := c.Start(); err != nil {
			return err
		}
		done := make(chan struct{})
		go func() { c.Wait(); close(done) }()
		mu.Lock()
		cmd, exited = c, done
		mu.Unlock()
		deadline := time.Now().Add(10 * time.Second)
		for redisPing(addr) != nil {
			select {
			case <-done:
				return fmt.Errorf("redis-server on %s exited", addr)
			case <-time.After(10 * time.Millisecond): // polling for readiness: no event to await
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("redis-server on %s not answering after 10s", addr)
			}
		}
		return nil
	}
	stop := func() error {
		mu.Lock()
		c, done := cmd, exited
		cmd = nil
		mu.Unlock()
		if c == nil {
			return nil
		}
		if err := c.Process.Kill(); err != nil {
			return err
		}
		<-done
		return nil
	}
	if err := start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stop() })
	mk := func(route bool) func(t testing.TB) esq.Queue {
		return func(t testing.TB) esq.Queue {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			q, err := redisq.New(ctx, redisq.Config{Addr: addr, ChannelPrefix: "es:", RetryInterval: 20 * time.Millisecond, Logger: testkit.SilentLogger(), RouteByKey: route})
			if err != nil {
				t.Fatal(err)
			}
			return q
		}
	}
	return queueBroker{newQueue: mk(false), newRouted: mk(true), stop: stop, start: start}
}

func redisPing(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}
