//go:build linux

package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"sync"
	"time"

	"github.com/entity-sync/entity-sync/internal/childproc"
)

// The floor: what delivering a change costs when nothing but the write
// system call is left. A plain TCP server holds the same number of
// connections as the row's clients and, for each change, writes one
// pre-encoded frame to every connection from as many goroutines as
// GOMAXPROCS: no broker, no fetch, no encoding, no queue. Its server CPU
// per frame is the limit a websocket server's per-frame cost is compared
// to.

// floorVersion is the version written into the floor's frame: a typical
// one for the peer rows, so the frame has the size of theirs.
const floorVersion = 1000

// floorFrame is the floor's pre-encoded frame: the entity's row in an
// unmasked websocket text frame, byte for byte what an entity-sync server
// writes for one change to one client.
func floorFrame() []byte {
	payload := appendPayload(nil, 1, floorVersion)
	if len(payload) > 125 {
		panic("floor payload needs an extended length")
	}
	return append([]byte{0x81, byte(len(payload))}, payload...)
}

// floorServer holds the accepted connections.
type floorServer struct {
	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

func runFloor(config) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		sayHello(hello{Err: "floor: " + err.Error()})
		return 1
	}
	s := &floorServer{conns: make(map[net.Conn]struct{})}
	go s.accept(l)
	mux := http.NewServeMux()
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, serverStats{CPUNanos: childproc.CPUNanos()}, nil)
	})
	mux.HandleFunc("/run", s.handleRun)
	ctl, stop, err := serveControl(mux)
	if err != nil {
		sayHello(hello{Err: "floor: " + err.Error()})
		return 1
	}
	sayHello(hello{WS: l.Addr().String(), Ctl: ctl})
	childproc.WaitForParent(childLifetime)
	stop()
	_ = l.Close()
	return 0
}

// accept keeps every connection until its client closes it.
func (s *floorServer) accept(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		go func() {
			_, _ = io.Copy(io.Discard, c) // returns when the client closes
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			_ = c.Close()
		}()
	}
}

// floorRun is /run's answer.
type floorRun struct {
	Conns    int    `json:"conns"`
	Writers  int    `json:"writers"`
	Frames   int64  `json:"frames"`
	Errors   int64  `json:"errors"`
	FirstErr string `json:"first_error,omitempty"`
	SlipMax  int64  `json:"slip_max_ns"`
}

// /run?conns=1000&n=1000&rate=200 waits for conns connections, then makes
// n changes at rate per second, each one frame to every connection.
func (s *floorServer) handleRun(w http.ResponseWriter, r *http.Request) {
	want, n, rate := intParam(r, "conns", 0), intParam(r, "n", 0), floatParam(r, "rate", 0)
	if want <= 0 || n <= 0 || n > 100000 || rate <= 0 {
		http.Error(w, "need conns > 0, 0 < n <= 100000, rate > 0", http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeoutParam(r, time.Minute))
	defer cancel()
	// Exactly want: a connection of the previous row whose close has not
	// been seen yet must not take a new one's place.
	var conns []net.Conn
	for {
		s.mu.Lock()
		have := len(s.conns)
		if have == want {
			for c := range s.conns {
				conns = append(conns, c)
			}
		}
		s.mu.Unlock()
		if conns != nil {
			break
		}
		if ctx.Err() != nil {
			writeJSON(w, nil, fmt.Errorf("have %d connections, want %d", have, want))
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	interval := time.Duration(float64(time.Second) / rate)
	// One deadline per connection for the whole run bounds a stuck write
	// without adding a timer update to every write.
	deadline := time.Now().Add(time.Duration(n)*interval + 30*time.Second)
	for _, c := range conns {
		_ = c.SetWriteDeadline(deadline)
	}
	res := floorRun{Conns: len(conns), Writers: runtime.GOMAXPROCS(0)}
	frame := floorFrame()
	var (
		mu   sync.Mutex
		tick sync.WaitGroup
	)
	// Each writer owns every Writers-th connection and writes the frame to
	// each of them when its channel ticks.
	ticks := make([]chan struct{}, res.Writers)
	for i := range ticks {
		ticks[i] = make(chan struct{})
		go func() {
			var frames, errs int64
			var first error
			for range ticks[i] {
				for j := i; j < len(conns); j += res.Writers {
					if _, err := conns[j].Write(frame); err != nil {
						errs++
						if first == nil {
							first = err
						}
					} else {
						frames++
					}
				}
				tick.Done()
			}
			mu.Lock()
			res.Frames += frames
			res.Errors += errs
			if first != nil && res.FirstErr == "" {
				res.FirstErr = first.Error()
			}
			mu.Unlock()
			tick.Done()
		}()
	}
	begin := time.Now()
	for k := range n {
		due := begin.Add(time.Duration(k) * interval)
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
		if ctx.Err() != nil {
			break
		}
		res.SlipMax = max(res.SlipMax, int64(time.Since(due)))
		tick.Add(len(ticks))
		for _, t := range ticks {
			t <- struct{}{}
		}
		tick.Wait()
	}
	tick.Add(len(ticks))
	for _, t := range ticks {
		close(t)
	}
	tick.Wait()
	writeJSON(w, res, nil)
}
