//go:build linux

package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// floorFleet is the floor phase's client side: plain TCP connections that
// only count the bytes they receive. The floor's frames are identical, so a
// connection has received k frames once it has k x frame bytes.
type floorFleet struct {
	mu      sync.Mutex
	conns   []*floorConn
	readers sync.WaitGroup
}

type floorConn struct {
	c     net.Conn
	bytes atomic.Int64
}

// /floor/open?addr=127.0.0.1:port&n=1000 connects n times to the floor
// server.
func (f *floorFleet) handleOpen(w http.ResponseWriter, r *http.Request) {
	addr, n := r.URL.Query().Get("addr"), intParam(r, "n", 0)
	if n <= 0 || n > maxClients {
		writeJSON(w, nil, fmt.Errorf("n must be in 1..%d", maxClients))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeoutParam(r, time.Minute))
	defer cancel()
	start := time.Now()
	var d net.Dialer
	res := openResult{}
	for range n {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			res.Errors++
			if res.FirstErr == "" {
				res.FirstErr = err.Error()
			}
			if ctx.Err() != nil {
				break
			}
			continue
		}
		fc := &floorConn{c: c}
		f.mu.Lock()
		f.conns = append(f.conns, fc)
		f.mu.Unlock()
		f.readers.Add(1)
		go f.read(fc)
		res.Opened++
	}
	res.Ms = msSince(start)
	writeJSON(w, res, nil)
}

func (f *floorFleet) read(fc *floorConn) {
	defer f.readers.Done()
	buf := make([]byte, 16<<10)
	for {
		n, err := fc.c.Read(buf)
		fc.bytes.Add(int64(n))
		if err != nil {
			return
		}
	}
}

// floorWait is /floor/wait's answer.
type floorWait struct {
	OK     bool    `json:"ok"`
	Bytes  int64   `json:"bytes"`
	Behind int     `json:"behind"`
	Ms     float64 `json:"ms"`
}

// /floor/wait?bytes=N waits until every connection has received N more
// bytes than when it was opened.
func (f *floorFleet) handleWait(w http.ResponseWriter, r *http.Request) {
	want := int64(intParam(r, "bytes", 0))
	deadline := time.Now().Add(timeoutParam(r, 30*time.Second))
	f.mu.Lock()
	conns := f.conns
	f.mu.Unlock()
	start := time.Now()
	var res floorWait
	for {
		res = floorWait{}
		for _, c := range conns {
			b := c.bytes.Load()
			res.Bytes += b
			if b < want {
				res.Behind++
			}
		}
		if res.Behind == 0 || time.Now().After(deadline) || r.Context().Err() != nil {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	res.OK = res.Behind == 0
	res.Ms = msSince(start)
	writeJSON(w, res, nil)
}

func (f *floorFleet) handleClose(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, map[string]int{"closed": f.closeAll()}, nil)
}

func (f *floorFleet) closeAll() int {
	f.mu.Lock()
	conns := f.conns
	f.conns = nil
	f.mu.Unlock()
	for _, c := range conns {
		_ = c.c.Close()
	}
	f.readers.Wait() // a closed socket's Read returns at once
	return len(conns)
}
