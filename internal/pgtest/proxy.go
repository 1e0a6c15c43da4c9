package pgtest

import (
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// Proxy is a TCP proxy in front of the test database, for tests that need
// Postgres to go away without stopping the machine's server (which other
// tests use): Stop drops every connection and refuses new ones, as a
// stopped server would; Freeze stops forwarding bytes without closing
// anything, as a cut network would.
type Proxy struct {
	target string
	addr   string
	dsn    string

	mu      sync.Mutex
	ln      net.Listener
	conns   map[net.Conn]struct{}
	frozen  bool
	thaw    chan struct{} // closed by Thaw
	stopped bool
	wg      sync.WaitGroup
}

// StartProxy starts a proxy to the test database on a free loopback port;
// it is stopped when the test ends.
func StartProxy(t testing.TB) *Proxy {
	t.Helper()
	Require(t)
	cfg, err := pgconn.ParseConfig(DSN())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{
		target: net.JoinHostPort(cfg.Host, fmt.Sprint(cfg.Port)),
		addr:   ln.Addr().String(),
		conns:  make(map[net.Conn]struct{}),
		thaw:   make(chan struct{}),
	}
	close(p.thaw)
	p.dsn = redirect(DSN(), p.addr)
	p.serve(ln)
	t.Cleanup(func() { p.Stop(); p.wg.Wait() })
	return p
}

// redirect returns dsn with its host and port replaced by addr.
func redirect(dsn, addr string) string {
	if u, err := url.Parse(dsn); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		u.Host = addr
		return u.String()
	}
	host, port, _ := net.SplitHostPort(addr)
	return strings.TrimSpace(dsn) + " host=" + host + " port=" + port
}

// DSN returns the connection string of the database through the proxy.
func (p *Proxy) DSN() string { return p.dsn }

func (p *Proxy) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln, p.stopped = ln, false
	p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				p.pipe(c)
			}()
		}
	}()
}

// pipe forwards between c and a new connection to the database.
func (p *Proxy) pipe(c net.Conn) {
	s, err := net.Dial("tcp", p.target)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		c.Close()
		s.Close()
		return
	}
	p.conns[c], p.conns[s] = struct{}{}, struct{}{}
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	forward := func(dst, src net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				p.mu.Lock()
				thaw := p.thaw
				p.mu.Unlock()
				<-thaw // frozen: hold the bytes
				if _, werr := dst.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		done <- struct{}{}
	}
	go forward(s, c)
	go forward(c, s)
	<-done
	c.Close()
	s.Close()
	<-done
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, s)
	p.mu.Unlock()
}

// Stop closes every proxied connection and stops accepting: connecting is
// refused until Start.
func (p *Proxy) Stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return
	}
	p.stopped = true
	p.ln.Close()
	for c := range p.conns {
		c.Close()
	}
	if p.frozen {
		p.frozen = false
		close(p.thaw)
	}
}

// Start accepts connections again on the same address.
func (p *Proxy) Start() error {
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		return fmt.Errorf("proxy: listen again on %s: %w", p.addr, err)
	}
	p.serve(ln)
	return nil
}

// Freeze stops forwarding bytes, in both directions and on every
// connection, new ones included, until Thaw.
func (p *Proxy) Freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.frozen {
		p.frozen = true
		p.thaw = make(chan struct{})
	}
}

// Thaw forwards again what Freeze held.
func (p *Proxy) Thaw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.frozen {
		p.frozen = false
		close(p.thaw)
	}
}
