package natsq_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esq/esqtest"
	"github.com/entity-sync/entity-sync/esq/natsq"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// machineURL is the NATS server this machine runs (.ci/run starts it).
const machineURL = "nats://127.0.0.1:4222"

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
	return "esqtest." + hex.EncodeToString(b) + "."
}

func newQueue(t testing.TB, cfg natsq.Config) *natsq.Queue {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = quietLogger()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := natsq.New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close(context.Background()) })
	return q
}

var invalidEntities = []shared.EntityType{"", "has space", "tab\tname", "star*", "gt>", "a..b", ".lead", "trail.",
	shared.EntityType(strings.Repeat("a", natsq.MaxSubjectLength+1))}

// The suite against the machine's NATS server, which the test cannot
// restart: the burst runs without a restart.
func TestConformanceMachineNATS(t *testing.T) {
	requireMachineNATS(t)
	prefix := randomPrefix(t)
	probe := newQueue(t, natsq.Config{URL: machineURL, SubjectPrefix: prefix})
	esqtest.Run(t, esqtest.Factory{
		NewQueue: func(t testing.TB) esq.Queue {
			return newQueue(t, natsq.Config{URL: machineURL, SubjectPrefix: prefix})
		},
	}, esqtest.Features{
		MaxPayload:      int(probe.MaxPayload()),
		InvalidEntities: invalidEntities,
	})
}

// The suite against an embedded nats-server that the burst stops and
// starts again on the same port.
func TestConformanceRestartedNATS(t *testing.T) {
	srv := startServer(t)
	esqtest.Run(t, esqtest.Factory{
		NewQueue: func(t testing.TB) esq.Queue {
			return newQueue(t, natsq.Config{URL: srv.URL(), SubjectPrefix: "es.", ReconnectWait: 50 * time.Millisecond})
		},
		Broker: srv,
	}, esqtest.Features{
		MaxPayload:       server.MAX_PAYLOAD_SIZE,
		InvalidEntities:  invalidEntities,
		BrokerGoroutines: []string{"github.com/nats-io/nats-server/v2/"},
	})
}

// A reconnect calls onLoss once the subscription is live again: a message
// published from another connection as soon as onLoss runs arrives.
func TestReconnectCallsOnLoss(t *testing.T) {
	srv := startServer(t)
	sub := newQueue(t, natsq.Config{URL: srv.URL(), ReconnectWait: 50 * time.Millisecond})
	pub := newQueue(t, natsq.Config{URL: srv.URL(), ReconnectWait: 50 * time.Millisecond})
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
		t.Fatal("no loss reported after the server restarted")
	}
	// The publisher may still be reconnecting: its message is buffered
	// and sent on reconnect.
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

// A subscription whose callback stalls past its pending limit makes nats.go
// drop messages; onLoss is called.
func TestSlowConsumerCallsOnLoss(t *testing.T) {
	srv := startServer(t)
	sub := newQueue(t, natsq.Config{URL: srv.URL(), PendingMsgs: 10})
	pub := newQueue(t, natsq.Config{URL: srv.URL()})
	var received atomic.Int64
	first := make(chan struct{})
	unblock := make(chan struct{})
	var once sync.Once
	lost := make(chan struct{}, 16)
	err := sub.Subscribe("items", func([]byte) {
		received.Add(1)
		once.Do(func() { close(first); <-unblock })
	}, func() {
		select {
		case lost <- struct{}{}:
		default:
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer close(unblock)
	const published = 200
	for i := 0; i < published; i++ {
		if err := pub.Publish(context.Background(), "items", []byte(fmt.Sprintf(`{"entity":"items","id":"%d"}`, i))); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			select {
			case <-first:
			case <-time.After(10 * time.Second):
				t.Fatal("first message not received")
			}
		}
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatalf("no loss reported; received %d of %d", received.Load(), published)
	}
}

func TestConfigErrors(t *testing.T) {
	ctx := context.Background()
	for _, prefix := range []string{"has space", "wild.*.", ".lead", "a..b."} {
		if _, err := natsq.New(ctx, natsq.Config{URL: machineURL, SubjectPrefix: prefix}); err == nil {
			t.Errorf("prefix %q accepted", prefix)
		} else {
			t.Logf("prefix %q: %v", prefix, err)
		}
	}
	// Nothing listens there.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	if _, err := natsq.New(ctx, natsq.Config{URL: "nats://" + addr}); err == nil || !strings.Contains(err.Error(), addr) {
		t.Errorf("connect to a closed port: got %v, want an error naming %s", err, addr)
	}
}

// natsServer is an embedded nats-server on a fixed random 127.0.0.1 port
// that can be stopped and started again.
type natsServer struct {
	t    testing.TB
	port int

	mu sync.Mutex
	s  *server.Server
}

func startServer(t testing.TB) *natsServer {
	t.Helper()
	n := &natsServer{t: t, port: server.RANDOM_PORT}
	if err := n.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Stop() })
	return n
}

func (n *natsServer) URL() string { return fmt.Sprintf("nats://127.0.0.1:%d", n.port) }

// Start starts the server on its port (a random one the first time) and
// returns once it accepts connections, retrying for up to 10s while the
// kernel releases the port.
func (n *natsServer) Start() error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: n.port, NoLog: true, NoSigs: true})
		if err != nil {
			return err
		}
		s.Start()
		if s.ReadyForConnections(5 * time.Second) {
			n.mu.Lock()
			n.s = s
			n.port = s.Addr().(*net.TCPAddr).Port
			n.mu.Unlock()
			return nil
		}
		s.Shutdown()
		if time.Now().After(deadline) {
			return fmt.Errorf("nats-server not ready on port %d", n.port)
		}
		time.Sleep(20 * time.Millisecond) // waiting on the kernel to free the port: no event to await
	}
}

// Stop shuts the server down, dropping every connection.
func (n *natsServer) Stop() error {
	n.mu.Lock()
	s := n.s
	n.s = nil
	n.mu.Unlock()
	if s != nil {
		s.Shutdown()
		s.WaitForShutdown()
	}
	return nil
}

// requireMachineNATS skips the test when nothing listens on 127.0.0.1:4222,
// unless CI is set (.ci/run starts the service, so there it must answer).
func requireMachineNATS(t testing.TB) {
	t.Helper()
	c, err := net.DialTimeout("tcp", "127.0.0.1:4222", time.Second)
	if err == nil {
		c.Close()
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("the machine's NATS at 127.0.0.1:4222 does not answer (.ci/run should have started it): %v", err)
	}
	t.Skipf("the machine's NATS at 127.0.0.1:4222 does not answer (%v); .ci/run starts it", err)
}

// A connection that goes silent without a reset (a proxy that stops
// forwarding but keeps it open) is noticed by nats.go's pings and replaced;
// onLoss is called and delivery works again.
func TestSilentConnectionIsReplaced(t *testing.T) {
	srv := startServer(t)
	p := testkit.StartProxy(t, strings.TrimPrefix(srv.URL(), "nats://"))
	sub := newQueue(t, natsq.Config{URL: "nats://" + p.Addr(), PingInterval: 100 * time.Millisecond, ReconnectWait: 20 * time.Millisecond})
	pub := newQueue(t, natsq.Config{URL: srv.URL()})
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

// The routing contract against the machine's NATS server.
func TestInterestMachineNATS(t *testing.T) {
	requireMachineNATS(t)
	prefix := randomPrefix(t)
	esqtest.RunInterest(t, esqtest.Factory{
		NewQueue: func(t testing.TB) esq.Queue {
			return newQueue(t, natsq.Config{URL: machineURL, SubjectPrefix: prefix, RouteByKey: true})
		},
	}, esqtest.Features{})
}

// The routing contract against an embedded nats-server that is restarted.
func TestInterestRestartedNATS(t *testing.T) {
	srv := startServer(t)
	esqtest.RunInterest(t, esqtest.Factory{
		NewQueue: func(t testing.TB) esq.Queue {
			return newQueue(t, natsq.Config{URL: srv.URL(), SubjectPrefix: "es.", ReconnectWait: 50 * time.Millisecond, RouteByKey: true})
		},
		Broker: srv,
	}, esqtest.Features{BrokerGoroutines: []string{"github.com/nats-io/nats-server/v2/"}})
}

// With RouteByKey, a stalled callback past PendingMsgs messages of watched
// keys makes nats.go drop them; onLoss is called.
func TestSlowConsumerOnKeySubjectsCallsOnLoss(t *testing.T) {
	srv := startServer(t)
	sub := newQueue(t, natsq.Config{URL: srv.URL(), PendingMsgs: 10, RouteByKey: true})
	pub := newQueue(t, natsq.Config{URL: srv.URL(), RouteByKey: true})
	first := make(chan struct{})
	unblock := make(chan struct{})
	var once sync.Once
	lost := make(chan struct{}, 16)
	err := sub.Subscribe("items", func([]byte) {
		once.Do(func() { close(first); <-unblock })
	}, func() {
		select {
		case lost <- struct{}{}:
		default:
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer close(unblock)
	key := shared.EntityKey{Entity: "items", ID: "hot"}
	if err := sub.Watch(key); err != nil {
		t.Fatal(err)
	}
	body := []byte(`{"entity":"items","id":"hot"}`)
	for i := 0; i < 200; i++ {
		if err := pub.Publish(context.Background(), "items", body); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			select {
			case <-first:
			case <-time.After(10 * time.Second):
				t.Fatal("first message not received")
			}
		}
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("no loss reported for a key subject's dropped messages")
	}
}

// holdProxy forwards TCP connections to target; while held, nothing from
// the server reaches the client (the connections stay open).
type holdProxy struct {
	l    net.Listener
	held sync.RWMutex
	mu   sync.Mutex
	cs   []net.Conn
}

func startHoldProxy(t *testing.T, target string) *holdProxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &holdProxy{l: l}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.cs = append(p.cs, c, s)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(s, c) }()
			go func() {
				buf := make([]byte, 32<<10)
				for {
					n, err := s.Read(buf)
					if err != nil {
						c.Close()
						return
					}
					p.held.RLock()
					_, err = c.Write(buf[:n])
					p.held.RUnlock()
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		p.mu.Lock()
		for _, c := range p.cs {
			c.Close()
		}
		p.mu.Unlock()
	})
	return p
}

// A Watch whose flush times out with the connection up (the server's
// replies held back past LiveTimeout) calls onLoss once a later flush goes
// through: the caller fetched without knowing it listened.
func TestLateWatchConfirmationCallsOnLoss(t *testing.T) {
	srv := startServer(t)
	proxy := startHoldProxy(t, strings.TrimPrefix(srv.URL(), "nats://"))
	sub := newQueue(t, natsq.Config{URL: "nats://" + proxy.l.Addr().String(), RouteByKey: true, LiveTimeout: 100 * time.Millisecond})
	pub := newQueue(t, natsq.Config{URL: srv.URL(), RouteByKey: true})
	got := make(chan string, 16)
	lost := make(chan struct{}, 16)
	if err := sub.Subscribe("items", func(b []byte) { got <- string(b) }, func() { lost <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	proxy.held.Lock()
	key := shared.EntityKey{Entity: "items", ID: "late"}
	err := sub.Watch(key)
	proxy.held.Unlock()
	if err == nil {
		t.Fatal("Watch returned no error while the server's replies were held")
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

// Watches of many keys that all give up waiting for their flush (the
// server's replies held back past LiveTimeout, the connection up) cost the
// entity type one onLoss once the replies come, not one per key.
func TestLateWatchesCallOnLossOnce(t *testing.T) {
	srv := startServer(t)
	proxy := startHoldProxy(t, strings.TrimPrefix(srv.URL(), "nats://"))
	sub := newQueue(t, natsq.Config{URL: "nats://" + proxy.l.Addr().String(), RouteByKey: true, LiveTimeout: 100 * time.Millisecond, PingInterval: time.Minute})
	pub := newQueue(t, natsq.Config{URL: srv.URL(), RouteByKey: true})
	got := make(chan string, 16)
	var losses atomic.Int32
	lost := make(chan struct{}, 64)
	if err := sub.Subscribe("items", func(b []byte) { got <- string(b) }, func() {
		losses.Add(1)
		lost <- struct{}{}
	}); err != nil {
		t.Fatal(err)
	}
	const keys = 20
	proxy.held.Lock()
	var wg sync.WaitGroup
	var confirmed atomic.Int32
	for i := 0; i < keys; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if sub.Watch(shared.EntityKey{Entity: "items", ID: fmt.Sprint("late-", i)}) == nil {
				confirmed.Add(1)
			}
		}()
	}
	wg.Wait()
	proxy.held.Unlock()
	if n := confirmed.Load(); n != 0 {
		t.Fatalf("%d Watches returned no error while the server's replies were held", n)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("no onLoss after the late confirmations")
	}
	// Two more round trips (a Watch's flush, a message through the
	// server) let any further late confirmation come in first.
	if err := sub.Watch(shared.EntityKey{Entity: "items", ID: "barrier"}); err != nil {
		t.Fatal(err)
	}
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
	if n := losses.Load(); n != 1 {
		t.Fatalf("%d onLoss calls for %d late Watches, want 1", n, keys)
	}
}
