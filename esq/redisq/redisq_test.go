package redisq_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esq/esqtest"
	"github.com/entity-sync/entity-sync/esq/redisq"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// machineAddr is the Redis this machine runs (.ci/run starts it).
const machineAddr = "127.0.0.1:6379"

func quietLogger() logrus.FieldLogger {
	l := logrus.New()
	l.SetLevel(logrus.ErrorLevel)
	return l
}

func randomPrefix(t testing.TB) string {
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return "esqtest:" + hex.EncodeToString(b) + ":"
}

func newQueue(t testing.TB, cfg redisq.Config) *redisq.Queue {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = quietLogger()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := redisq.New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close(context.Background()) })
	return q
}

var invalidEntities = []shared.EntityType{"", "has space", "new\nline", "nul\x00",
	shared.EntityType(strings.Repeat("a", redisq.MaxChannelLength+1))}

// The suite against the machine's Redis, which the test cannot restart: the
// burst runs without a restart. A random channel prefix keeps runs apart.
func TestConformanceMachineRedis(t *testing.T) {
	requireMachineRedis(t)
	prefix := randomPrefix(t)
	esqtest.Run(t, esqtest.Factory{
		NewQueue: func(t testing.TB) esq.Queue {
			return newQueue(t, redisq.Config{Addr: machineAddr, ChannelPrefix: prefix})
		},
	}, esqtest.Features{
		MaxPayload:      redisq.DefaultMaxPayload,
		InvalidEntities: invalidEntities,
	})
}

// The suite against a redis-server child process on a random port, which the
// burst kills and starts again.
func TestConformanceRestartedRedis(t *testing.T) {
	srv := startRedis(t)
	esqtest.Run(t, esqtest.Factory{
		NewQueue: func(t testing.TB) esq.Queue {
			return newQueue(t, redisq.Config{Addr: srv.addr, ChannelPrefix: "es:", RetryInterval: 20 * time.Millisecond})
		},
		Broker: srv,
	}, esqtest.Features{
		MaxPayload:      redisq.DefaultMaxPayload,
		InvalidEntities: invalidEntities,
	})
}

// A reconnect calls onLoss once Redis confirmed the subscription again: a
// message published as soon as onLoss runs arrives.
func TestReconnectCallsOnLoss(t *testing.T) {
	srv := startRedis(t)
	sub := newQueue(t, redisq.Config{Addr: srv.addr, RetryInterval: 20 * time.Millisecond})
	pub := newQueue(t, redisq.Config{Addr: srv.addr})
	got := make(chan string, 16)
	lost := make(chan struct{}, 16)
	if err := sub.Subscribe("items", func(b []byte) { got <- string(b) }, func() { lost <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("no loss reported after Redis restarted")
	}
	// The publisher's pooled connection died with the server: retry.
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := pub.Publish(context.Background(), "items", []byte(`{"entity":"items","id":"after"}`))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
	select {
	case b := <-got:
		if b != `{"entity":"items","id":"after"}` {
			t.Fatalf("received %s", b)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("message published after onLoss not received")
	}
}

// Subscribe waits for Redis's confirmation: with Redis gone, it fails with
// a clear error within LiveTimeout, and New fails when Redis does not answer.
func TestErrorsWhenRedisIsDown(t *testing.T) {
	srv := startRedis(t)
	q := newQueue(t, redisq.Config{Addr: srv.addr, LiveTimeout: 500 * time.Millisecond})
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	err := q.Subscribe("items", func([]byte) {}, nil)
	if err == nil || !strings.Contains(err.Error(), srv.addr) {
		t.Fatalf("Subscribe with Redis down: got %v, want an error naming %s", err, srv.addr)
	}
	t.Log(err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := redisq.New(ctx, redisq.Config{Addr: srv.addr}); err == nil || !strings.Contains(err.Error(), srv.addr) {
		t.Fatalf("New with Redis down: got %v, want an error naming %s", err, srv.addr)
	} else {
		t.Log(err)
	}
	if _, err := redisq.New(ctx, redisq.Config{Addr: machineAddr, ChannelPrefix: "bad prefix"}); err == nil {
		t.Fatal("prefix with a space accepted")
	}
}

// redisServer is a redis-server child process on a fixed random port that
// can be stopped (killed) and started again.
type redisServer struct {
	t    testing.TB
	bin  string
	port int
	addr string

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has exited
}

func startRedis(t testing.TB) *redisServer {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("redis-server is not installed (.ci/run installs it): the restart tests need it")
		}
		t.Skip("redis-server is not installed: the restart tests need it (apt-get install redis-server)")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	r := &redisServer{t: t, bin: bin, port: port, addr: "127.0.0.1:" + strconv.Itoa(port)}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Stop() })
	return r
}

// Start starts redis-server and returns once it answers PING.
func (r *redisServer) Start() error {
	cmd := exec.Command(r.bin, "--port", strconv.Itoa(r.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", r.t.TempDir())
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start redis-server: %w", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	r.mu.Lock()
	r.cmd, r.exited = cmd, exited
	r.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for ping(r.addr) != nil {
		select {
		case <-exited:
			return fmt.Errorf("redis-server on port %d exited: %v", r.port, cmd.ProcessState)
		case <-time.After(10 * time.Millisecond): // polling for readiness: no event to await
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("redis-server on port %d not answering after 10s", r.port)
		}
	}
	return nil
}

// Stop kills redis-server, as a crash would, and waits until it has exited.
func (r *redisServer) Stop() error {
	r.mu.Lock()
	cmd, exited := r.cmd, r.exited
	r.cmd = nil
	r.mu.Unlock()
	if cmd == nil {
		return nil
	}
	if err := cmd.Process.Kill(); err != nil {
		return err
	}
	<-exited
	return nil
}

func ping(addr string) error {
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

// go-redis logs every failed dial of the restart tests to stderr through its
// package-level logger; the tests silence it (the library leaves it alone).
func TestMain(m *testing.M) {
	redis.SetLogger(silent{})
	os.Exit(m.Run())
}

type silent struct{}

func (silent) Printf(context.Context, string, ...interface{}) {}

// requireMachineRedis skips the test when nothing listens on 127.0.0.1:6379,
// unless CI is set (.ci/run starts the service, so there it must answer).
func requireMachineRedis(t testing.TB) {
	t.Helper()
	c, err := net.DialTimeout("tcp", "127.0.0.1:6379", time.Second)
	if err == nil {
		c.Close()
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("the machine's Redis at 127.0.0.1:6379 does not answer (.ci/run should have started it): %v", err)
	}
	t.Skipf("the machine's Redis at 127.0.0.1:6379 does not answer (%v); .ci/run starts it", err)
}

// A subscriber connection that goes silent without a reset (here a proxy
// that stops forwarding but keeps the connection open, as a vanished peer
// or a NAT that forgot it would) is noticed by the pings, replaced, and
// reported through onLoss; delivery works again afterwards.
func TestSilentConnectionIsReplaced(t *testing.T) {
	requireMachineRedis(t)
	p := testkit.StartProxy(t, machineAddr)
	prefix := randomPrefix(t)
	sub := newQueue(t, redisq.Config{Addr: p.Addr(), ChannelPrefix: prefix, PingInterval: 100 * time.Millisecond, RetryInterval: 20 * time.Millisecond})
	pub := newQueue(t, redisq.Config{Addr: machineAddr, ChannelPrefix: prefix})
	got := make(chan string, 16)
	lost := make(chan struct{}, 16)
	if err := sub.Subscribe("items", func(b []byte) { got <- string(b) }, func() { lost <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	p.Freeze()
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("the silent connection was not noticed")
	}
	if err := pub.Publish(context.Background(), "items", []byte(`{"entity":"items","id":"after"}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if b != `{"entity":"items","id":"after"}` {
			t.Fatalf("received %s", b)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("message published after onLoss not received")
	}
}

// The routing contract against the machine's Redis.
func TestInterestMachineRedis(t *testing.T) {
	requireMachineRedis(t)
	prefix := randomPrefix(t)
	esqtest.RunInterest(t, esqtest.Factory{
		NewQueue: func(t testing.TB) esq.Queue {
			return newQueue(t, redisq.Config{Addr: machineAddr, ChannelPrefix: prefix, RouteByKey: true})
		},
	}, esqtest.Features{})
}

// The routing contract against a redis-server child process that is
// restarted.
func TestInterestRestartedRedis(t *testing.T) {
	srv := startRedis(t)
	esqtest.RunInterest(t, esqtest.Factory{
		NewQueue: func(t testing.TB) esq.Queue {
			return newQueue(t, redisq.Config{Addr: srv.addr, ChannelPrefix: "es:", RetryInterval: 20 * time.Millisecond, RouteByKey: true})
		},
		Broker: srv,
	}, esqtest.Features{})
}

// A Watch that gives up waiting for Redis's confirmation (Redis paused
// longer than LiveTimeout, the connection up) leaves the channel
// subscribed, and its late confirmation calls onLoss: the caller fetched
// without knowing it listened.
func TestLateWatchConfirmationCallsOnLoss(t *testing.T) {
	srv := startRedis(t)
	sub := newQueue(t, redisq.Config{Addr: srv.addr, RouteByKey: true, LiveTimeout: 100 * time.Millisecond})
	pub := newQueue(t, redisq.Config{Addr: srv.addr, RouteByKey: true})
	got := make(chan string, 16)
	lost := make(chan struct{}, 16)
	if err := sub.Subscribe("items", func(b []byte) { got <- string(b) }, func() { lost <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	admin := redis.NewClient(&redis.Options{Addr: srv.addr})
	defer admin.Close()
	if err := admin.Do(context.Background(), "client", "pause", "500", "all").Err(); err != nil {
		t.Fatal(err)
	}
	key := shared.EntityKey{Entity: "items", ID: "late"}
	if err := sub.Watch(key); err == nil {
		t.Fatal("Watch returned no error while Redis was paused")
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("no onLoss after the late confirmation")
	}
	body := `{"entity":"items","id":"late"}`
	if err := pub.Publish(context.Background(), "items", []byte(body)); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if b != body {
			t.Fatalf("received %s", b)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the late-confirmed key's message did not arrive")
	}
}

// Watches of many keys that all give up waiting for Redis's confirmation
// (Redis paused longer than LiveTimeout, the connection up) cost the
// entity type one onLoss once the confirmations come, not one per key.
func TestLateWatchesCallOnLossOnce(t *testing.T) {
	srv := startRedis(t)
	sub := newQueue(t, redisq.Config{Addr: srv.addr, RouteByKey: true, LiveTimeout: 100 * time.Millisecond})
	pub := newQueue(t, redisq.Config{Addr: srv.addr, RouteByKey: true})
	got := make(chan string, 16)
	var mu sync.Mutex
	losses := 0
	lost := make(chan struct{}, 64)
	if err := sub.Subscribe("items", func(b []byte) { got <- string(b) }, func() {
		mu.Lock()
		losses++
		mu.Unlock()
		lost <- struct{}{}
	}); err != nil {
		t.Fatal(err)
	}
	admin := redis.NewClient(&redis.Options{Addr: srv.addr})
	defer admin.Close()
	if err := admin.Do(context.Background(), "client", "pause", "1000", "all").Err(); err != nil {
		t.Fatal(err)
	}
	const keys = 20
	var wg sync.WaitGroup
	errs := make(chan error, keys)
	for i := 0; i < keys; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- sub.Watch(shared.EntityKey{Entity: "items", ID: "late-" + strconv.Itoa(i)})
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err == nil {
			t.Fatal("a Watch returned no error while Redis was paused")
		}
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("no onLoss after the late confirmations")
	}
	// A message through the subscriber connection comes after every
	// confirmation, and the callbacks run in order.
	body := `{"entity":"items","id":"late-0"}`
	if err := pub.Publish(context.Background(), "items", []byte(body)); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if b != body {
			t.Fatalf("received %s", b)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a late-confirmed key's message did not arrive")
	}
	mu.Lock()
	defer mu.Unlock()
	if losses != 1 {
		t.Fatalf("%d onLoss calls for %d late Watches, want 1", losses, keys)
	}
}

// Keys watched while Redis is down (their Watch gives up) cost the entity
// type one onLoss once Redis is back and has confirmed every channel, not
// one per key on top of the reconnect's.
func TestWatchesDuringOutageCallOnLossOnce(t *testing.T) {
	srv := startRedis(t)
	sub := newQueue(t, redisq.Config{Addr: srv.addr, RouteByKey: true, LiveTimeout: 100 * time.Millisecond, RetryInterval: 20 * time.Millisecond})
	pub := newQueue(t, redisq.Config{Addr: srv.addr, RouteByKey: true})
	got := make(chan string, 16)
	var mu sync.Mutex
	losses := 0
	lost := make(chan struct{}, 64)
	if err := sub.Subscribe("items", func(b []byte) { got <- string(b) }, func() {
		mu.Lock()
		losses++
		mu.Unlock()
		lost <- struct{}{}
	}); err != nil {
		t.Fatal(err)
	}
	watch := func(id string) error { return sub.Watch(shared.EntityKey{Entity: "items", ID: id}) }
	if err := watch("before"); err != nil {
		t.Fatal(err)
	}
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); sub.Live() == nil; {
		if time.Now().After(deadline) {
			t.Fatal("the queue still says live with Redis stopped")
		}
		time.Sleep(5 * time.Millisecond) // polls Live: no event to await
	}
	const keys = 20
	var wg sync.WaitGroup
	errs := make(chan error, keys)
	for i := 0; i < keys; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- watch("down-" + strconv.Itoa(i))
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err == nil {
			t.Fatal("a Watch returned no error while Redis was down")
		}
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("no onLoss after Redis came back")
	}
	body := `{"entity":"items","id":"down-0"}`
	if err := pub.Publish(context.Background(), "items", []byte(body)); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if b != body {
			t.Fatalf("received %s", b)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a key watched during the outage: its message did not arrive")
	}
	mu.Lock()
	defer mu.Unlock()
	if losses != 1 {
		t.Fatalf("%d onLoss calls for one outage with %d keys watched during it, want 1", losses, keys)
	}
}
