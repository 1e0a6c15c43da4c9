//go:build linux

package main

import (
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/entity-sync/entity-sync/esbridge"
)

// The breakdown phase's server-side instruments, in the entity-sync server
// process started with -stamp only (the peer and floor phases never run
// them): every fetch round the bridge reports through Options.OnRound,
// with the version its fetch read, and the time of every write to every
// client's socket.

// roundRec is one fetch round as OnRound reported it, times in UnixNano (0
// for a zero time).
type roundRec struct {
	V          int64 `json:"v"` // the version the round's fetch read
	Notified   int64 `json:"notified"`
	Started    int64 `json:"started"`
	Fetched    int64 `json:"fetched"`
	Delivered  int64 `json:"delivered"`
	Deliveries int   `json:"deliveries"`
}

// stamps holds what the instruments recorded since the last /stamps/record.
type stamps struct {
	recording atomic.Bool
	fetchedV  atomic.Int64 // the version the running round's fetch read

	mu     sync.Mutex
	rounds []roundRec
	conns  map[string]*connWrites // by the client's address (the socket's remote address)
}

// connWrites is the UnixNano time of each write to one socket.
type connWrites struct {
	mu sync.Mutex
	at []int64
}

func newStamps() *stamps { return &stamps{conns: make(map[string]*connWrites)} }

// fetched notes the version a fetch read. The benchmark serves one key, and
// a key's rounds never overlap, so the round that reports next is the one
// that read it.
func (s *stamps) fetched(v int64) { s.fetchedV.Store(v) }

// onRound is esbridge.Options.OnRound.
func (s *stamps) onRound(r esbridge.Round) {
	if !s.recording.Load() {
		return
	}
	rec := roundRec{
		V:        s.fetchedV.Load(),
		Notified: unixNano(r.Notified), Started: unixNano(r.Started),
		Fetched: unixNano(r.Fetched), Delivered: unixNano(r.Delivered),
		Deliveries: r.Deliveries,
	}
	s.mu.Lock()
	s.rounds = append(s.rounds, rec)
	s.mu.Unlock()
}

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

// stampsResult is /stamps/result's answer.
type stampsResult struct {
	Rounds []roundRec         `json:"rounds"`
	Writes map[string][]int64 `json:"writes"` // by client address
}

// control adds /stamps/record (forget everything, start recording) and
// /stamps/result (stop, return what was recorded) to mux.
func (s *stamps) control(mux *http.ServeMux) {
	mux.HandleFunc("/stamps/record", func(w http.ResponseWriter, _ *http.Request) {
		s.mu.Lock()
		s.rounds = s.rounds[:0]
		for _, c := range s.conns {
			c.mu.Lock()
			c.at = c.at[:0]
			c.mu.Unlock()
		}
		s.mu.Unlock()
		s.recording.Store(true)
		writeJSON(w, struct{}{}, nil)
	})
	mux.HandleFunc("/stamps/result", func(w http.ResponseWriter, _ *http.Request) {
		s.recording.Store(false)
		res := stampsResult{Writes: make(map[string][]int64)}
		s.mu.Lock()
		res.Rounds = append([]roundRec(nil), s.rounds...)
		for addr, c := range s.conns {
			c.mu.Lock()
			if len(c.at) > 0 {
				res.Writes[addr] = append([]int64(nil), c.at...)
			}
			c.mu.Unlock()
		}
		s.mu.Unlock()
		writeJSON(w, res, nil)
	})
}

// listener wraps l so that every accepted connection's writes are stamped.
func (s *stamps) listener(l net.Listener) net.Listener { return stampListener{l, s} }

type stampListener struct {
	net.Listener
	s *stamps
}

func (l stampListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	w := &connWrites{}
	l.s.mu.Lock()
	l.s.conns[c.RemoteAddr().String()] = w
	l.s.mu.Unlock()
	return &stampConn{Conn: c, s: l.s, w: w}, nil
}

// stampConn stamps both ways entity-sync writes to a socket: Write (the
// connection's flusher, handshakes) and the raw descriptor writes of the
// fan-out's direct path, which reaches the socket through SyscallConn.
// Forwarding SyscallConn keeps that direct path: a net.Conn without it is
// written by the flusher alone, which would change what is measured.
type stampConn struct {
	net.Conn
	s *stamps
	w *connWrites
}

func (c *stampConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.stamp()
	return n, err
}

func (c *stampConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.New("not a socket")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	return stampRaw{rc, c}, nil
}

func (c *stampConn) stamp() {
	if !c.s.recording.Load() {
		return
	}
	t := time.Now().UnixNano()
	c.w.mu.Lock()
	c.w.at = append(c.w.at, t)
	c.w.mu.Unlock()
}

type stampRaw struct {
	syscall.RawConn
	c *stampConn
}

func (r stampRaw) Write(f func(fd uintptr) bool) error {
	err := r.RawConn.Write(f)
	r.c.stamp()
	return err
}
