package testkit

import (
	"net"
	"sync"
	"testing"
)

// Proxy forwards TCP connections from a local port to a target: the broker
// tests put it between a queue and its broker to cut or freeze the network
// without touching the broker.
type Proxy struct {
	l  net.Listener
	wg sync.WaitGroup

	mu     sync.Mutex
	conns  []net.Conn      // nil once closed
	frozen []chan struct{} // one per connection pair still forwarding
}

// StartProxy listens on 127.0.0.1 and forwards every connection to target,
// until the test ends or Close.
func StartProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{l: l, conns: []net.Conn{}}
	p.wg.Add(1)
	go p.accept(target)
	t.Cleanup(p.Close)
	return p
}

// Addr is the proxy's address.
func (p *Proxy) Addr() string { return p.l.Addr().String() }

func (p *Proxy) accept(target string) {
	defer p.wg.Done()
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", target)
		if err != nil {
			c.Close()
			continue
		}
		stop := make(chan struct{})
		p.mu.Lock()
		if p.conns == nil { // closed meanwhile
			p.mu.Unlock()
			c.Close()
			u.Close()
			return
		}
		p.conns = append(p.conns, c, u)
		p.frozen = append(p.frozen, stop)
		p.mu.Unlock()
		for _, pair := range [][2]net.Conn{{c, u}, {u, c}} {
			p.wg.Add(1)
			go p.forward(pair[0], pair[1], stop)
		}
	}
}

// forward copies from to to until either ends; once stop is closed it reads
// on and drops what it reads, so the peer hears nothing more.
func (p *Proxy) forward(from, to net.Conn, stop chan struct{}) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := from.Read(buf)
		if err != nil {
			to.Close()
			return
		}
		select {
		case <-stop:
			continue
		default:
		}
		if _, err := to.Write(buf[:n]); err != nil {
			return
		}
	}
}

// Freeze makes the connections open so far stop forwarding without closing
// them: a network gone silent.
func (p *Proxy) Freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, stop := range p.frozen {
		close(stop)
	}
	p.frozen = nil
}

// Close stops accepting, cuts every forwarded connection and waits for the
// proxy's goroutines. It may be called more than once.
func (p *Proxy) Close() {
	p.l.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
	p.mu.Unlock()
	p.wg.Wait()
}
