//go:build linux

package main

import (
	"errors"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/entity-sync/entity-sync/internal/childproc"
)

// What every server under test (seed, api, cf) has besides its websocket
// endpoint: the app's write endpoint, through which every change of every
// system arrives, and the control endpoints the orchestrator reads its
// counters through.

// changePath is the app's write endpoint, on the same router and listener
// as the websocket endpoint: POST /bench/change?id=12 writes entity 12 (a
// new version in the cell) and tells the system it changed, as an app's
// HTTP handler does after a committed write.
const changePath = "/bench/change"

// notifyFunc tells the system under test that entity id changed to
// version v: entity-sync's NotifyAllOfChange (its fetch reads v from the
// cell), Centrifuge's Publish of the row.
type notifyFunc func(id int, v int64) error

// changeHandler is the write endpoint. Its answer is
// {"v":V,"at":T,"call":C}: the version the change made, the UnixNano time
// it was made (taken before the write: a fetch for an earlier notify may
// already read the new version), the zero point of every client's
// "visible" latency, and how long the write and notify took in ns. With
// noop=1 in the query it writes the version and notifies nothing: the
// endpoint's own cost, which every system's CPU figures include.
func changeHandler(cell *versionCell, notify notifyFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		id, err := strconv.Atoi(q.Get("id"))
		noop := q.Has("noop")
		if err != nil || id <= 0 || id > maxKeys {
			http.Error(w, "id must be in 1..100000", http.StatusBadRequest)
			return
		}
		start := time.Now()
		v := cell.bump(id)
		if !noop {
			if err := notify(id, v); err != nil {
				http.Error(w, "notify: "+err.Error(), http.StatusInternalServerError)
				return
			}
		}
		call := time.Since(start)
		b := make([]byte, 0, 64)
		b = append(b, `{"v":`...)
		b = strconv.AppendInt(b, v, 10)
		b = append(b, `,"at":`...)
		b = strconv.AppendInt(b, start.UnixNano(), 10)
		b = append(b, `,"call":`...)
		b = strconv.AppendInt(b, int64(call), 10)
		b = append(b, "}\n"...)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(b)
	}
}

// serverStats is /stats's answer from a server process.
type serverStats struct {
	CPUNanos int64  `json:"cpu_ns"`
	Mallocs  uint64 `json:"mallocs"` // runtime.MemStats.Mallocs: heap objects allocated so far
	Fetches  int64  `json:"fetches"` // calls of the app's fetch function (entity-sync)
}

// serverControl is the control mux every server under test has: /stats for
// its CPU time, allocations and fetches (fetches may be nil), and
// /profile/start?path= and /profile/stop for a CPU profile of the process
// and its allocation profiles at both ends.
func serverControl(fetches *atomic.Int64) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		st := serverStats{CPUNanos: childproc.CPUNanos(), Mallocs: ms.Mallocs}
		if fetches != nil {
			st.Fetches = fetches.Load()
		}
		writeJSON(w, st, nil)
	})
	var prof profiler
	mux.HandleFunc("/profile/start", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, struct{}{}, prof.start(r.URL.Query().Get("path")))
	})
	mux.HandleFunc("/profile/stop", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, struct{}{}, prof.stop())
	})
	return mux
}

// profiler writes one CPU profile at a time (-profile).
type profiler struct {
	mu sync.Mutex
	f  *os.File
}

func (p *profiler) start(path string) error {
	if path == "" {
		return errors.New("no path")
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.f != nil {
		return errors.New("a profile is already running")
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return err
	}
	p.f = f
	return writeAllocs(path + ".allocs-start")
}

// writeAllocs writes the process's allocation profile (cumulative since it
// started) to path: the window's allocations are the difference between the
// one at its stop and the one at its start (go tool pprof -base). Sampled
// at runtime.MemProfileRate; GODEBUG=memprofilerate=1 in the orchestrator's
// environment, which its children inherit, records every allocation.
// The GC it runs makes profiled windows no place to read CPU figures from.
func writeAllocs(path string) error {
	runtime.GC() // the profile shows allocations as of the last GC
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func (p *profiler) stop() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.f == nil {
		return nil
	}
	pprof.StopCPUProfile()
	err := p.f.Close()
	path := p.f.Name()
	p.f = nil
	return errors.Join(err, writeAllocs(path+".allocs-stop"))
}
