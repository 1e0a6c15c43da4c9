// Package nsqtest runs real NSQ brokers (nsqd, nsqlookupd from
// github.com/nsqio/nsq v1.3.0) inside a process, on random 127.0.0.1 ports,
// so tests, the benchmark and the JavaScript client's test server talk to NSQ
// over TCP exactly as production does.
package nsqtest

import (
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/nsqio/nsq/nsqd"
	"github.com/nsqio/nsq/nsqlookupd"
)

// logger keeps the brokers quiet unless NSQTEST_VERBOSE is set.
type logger struct{ name string }

func (l logger) Output(_ int, s string) error {
	if os.Getenv("NSQTEST_VERBOSE") != "" {
		fmt.Fprintf(os.Stderr, "[%s] %s\n", l.name, s)
	}
	return nil
}

// NSQD is an embedded nsqd that can be stopped and started again on the same
// ports.
type NSQD struct {
	dataPath string
	ownsDir  bool // dataPath was made by Embed and is removed by Close
	lookupds []string
	memQueue int64

	mu       sync.Mutex
	d        *nsqd.NSQD
	done     chan struct{}
	tcpAddr  string
	httpAddr string
}

// Embed starts an nsqd on random 127.0.0.1 ports with its data in a new
// temporary directory, registering with the given nsqlookupd TCP addresses.
// Close stops it and removes the directory.
func Embed(lookupdTCPAddrs ...string) (*NSQD, error) {
	return EmbedWith(Options{LookupdTCPAddrs: lookupdTCPAddrs})
}

// Options configures an embedded nsqd beyond Embed's defaults.
type Options struct {
	// LookupdTCPAddrs are the nsqlookupd TCP addresses nsqd registers with.
	LookupdTCPAddrs []string
	// MemQueueSize is nsqd's --mem-queue-size: how many messages a topic or
	// channel holds in memory. An ephemeral channel drops what exceeds it.
	// Zero keeps nsqd's default (10,000).
	MemQueueSize int64
}

// EmbedWith is Embed with options.
func EmbedWith(o Options) (*NSQD, error) {
	dir, err := os.MkdirTemp("", "entity-sync-nsqd-")
	if err != nil {
		return nil, err
	}
	n := &NSQD{dataPath: dir, ownsDir: true, lookupds: o.LookupdTCPAddrs, memQueue: o.MemQueueSize}
	if err := n.start("127.0.0.1:0", "127.0.0.1:0"); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("nsqtest: start nsqd: %w", err)
	}
	return n, nil
}

// StartNSQD is Embed for a test: it fails the test on error and closes the
// nsqd when the test ends.
func StartNSQD(t testing.TB, lookupdTCPAddrs ...string) *NSQD {
	t.Helper()
	return StartNSQDWith(t, Options{LookupdTCPAddrs: lookupdTCPAddrs})
}

// StartNSQDWith is StartNSQD with options.
func StartNSQDWith(t testing.TB, o Options) *NSQD {
	t.Helper()
	n, err := EmbedWith(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Close)
	return n
}

func (n *NSQD) start(tcp, http string) error {
	opts := nsqd.NewOptions()
	opts.TCPAddress = tcp
	opts.HTTPAddress = http
	opts.HTTPSAddress = ""
	opts.BroadcastAddress = "127.0.0.1"
	opts.DataPath = n.dataPath
	opts.NSQLookupdTCPAddresses = n.lookupds
	opts.Logger = logger{"nsqd"}
	if n.memQueue != 0 {
		opts.MemQueueSize = n.memQueue
	}
	d, err := nsqd.New(opts)
	if err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := d.Main(); err != nil {
			fmt.Fprintf(os.Stderr, "nsqtest: nsqd exited: %v\n", err)
		}
	}()
	n.mu.Lock()
	n.d, n.done = d, done
	n.tcpAddr, n.httpAddr = d.RealTCPAddr().String(), d.RealHTTPAddr().String()
	n.mu.Unlock()
	return nil
}

// TCPAddr is the address clients connect to ("127.0.0.1:port").
func (n *NSQD) TCPAddr() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.tcpAddr
}

// HTTPAddr is the nsqd HTTP API address.
func (n *NSQD) HTTPAddr() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.httpAddr
}

// Stop exits nsqd (dropping everything on ephemeral channels, as a real
// nsqd does) and waits for it. Stopping a stopped nsqd does nothing.
func (n *NSQD) Stop() {
	n.mu.Lock()
	d, done := n.d, n.done
	n.d = nil
	n.mu.Unlock()
	if d == nil {
		return
	}
	d.Exit()
	<-done
}

// Close stops nsqd for good and removes the data directory Embed made.
func (n *NSQD) Close() {
	n.Stop()
	if n.ownsDir {
		os.RemoveAll(n.dataPath)
	}
}

// Start starts a stopped nsqd again on its previous ports, retrying for up
// to 10s while the kernel releases them.
func (n *NSQD) Start() error {
	tcp, http := n.TCPAddr(), n.HTTPAddr()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := n.start(tcp, http)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nsqtest: restart nsqd on %s: %w", tcp, err)
		}
		time.Sleep(20 * time.Millisecond) // waiting on the kernel to free the port: no event to await
	}
}

// Restart stops nsqd and starts it again on the same ports.
func (n *NSQD) Restart() error {
	n.Stop()
	return n.Start()
}

// Lookupd is an embedded nsqlookupd.
type Lookupd struct {
	l    *nsqlookupd.NSQLookupd
	done chan struct{}
}

// StartLookupd starts an nsqlookupd on random ports and stops it when the
// test ends.
func StartLookupd(t testing.TB) *Lookupd {
	t.Helper()
	opts := nsqlookupd.NewOptions()
	opts.TCPAddress = "127.0.0.1:0"
	opts.HTTPAddress = "127.0.0.1:0"
	opts.BroadcastAddress = "127.0.0.1"
	opts.Logger = logger{"nsqlookupd"}
	l, err := nsqlookupd.New(opts)
	if err != nil {
		t.Fatalf("nsqtest: start nsqlookupd: %v", err)
	}
	lk := &Lookupd{l: l, done: make(chan struct{})}
	go func() {
		defer close(lk.done)
		_ = l.Main()
	}()
	t.Cleanup(func() { l.Exit(); <-lk.done })
	return lk
}

// TCPAddr is where nsqd registers.
func (l *Lookupd) TCPAddr() string { return l.l.RealTCPAddr().String() }

// HTTPAddr is where consumers look topics up.
func (l *Lookupd) HTTPAddr() string { return l.l.RealHTTPAddr().String() }
