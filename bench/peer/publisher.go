//go:build linux

package main

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"time"

	"github.com/entity-sync/entity-sync/internal/childproc"
)

// notifyFunc tells the system under test that the entity changed to
// version v: entity-sync's NotifyAllOfChange (the fetch reads v from the
// cell), Centrifuge's Publish of the row.
type notifyFunc func(v int64) error

// publishResult is /publish's answer: when each change was notified, the
// zero point of every client's "visible" latency.
type publishResult struct {
	FirstV   int64   `json:"first_v"`
	NotifyNs []int64 `json:"notify_ns"` // UnixNano of change FirstV+i's notify
	CallNs   []int64 `json:"call_ns"`   // how long change FirstV+i's notify call took
	Errors   int     `json:"errors"`
	FirstErr string  `json:"first_error,omitempty"`
	// How long the notify calls took, and how far the schedule slipped
	// because one took longer than the interval.
	CallP99 int64 `json:"call_p99_ns"`
	CallMax int64 `json:"call_max_ns"`
	SlipMax int64 `json:"slip_max_ns"`
}

// publish makes n changes at rate per second from one goroutine, in order,
// as one app server writing and then notifying would: bump the cell, note
// the time, notify. A notify slower than the interval delays the next
// change (the slip is reported); the notify time recorded is always the
// real one, so a late change is not counted as latency.
func publish(ctx context.Context, cell *versionCell, notify notifyFunc, n int, rate float64) publishResult {
	res := publishResult{NotifyNs: make([]int64, 0, n), CallNs: make([]int64, 0, n)}
	calls := make([]int64, 0, n)
	interval := time.Duration(float64(time.Second) / rate)
	begin := time.Now()
	for k := range n {
		due := begin.Add(time.Duration(k) * interval)
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
		if ctx.Err() != nil {
			res.Errors++
			if res.FirstErr == "" {
				res.FirstErr = fmt.Sprintf("cancelled after %d changes", k)
			}
			break
		}
		// The change's moment is taken before the change: entity-sync's
		// fetch for an earlier notify may already read this version.
		start := time.Now()
		v := cell.bump()
		if k == 0 {
			res.FirstV = v
		}
		res.SlipMax = max(res.SlipMax, int64(start.Sub(due)))
		err := notify(v)
		call := int64(time.Since(start))
		calls = append(calls, call)
		res.CallNs = append(res.CallNs, call)
		res.NotifyNs = append(res.NotifyNs, start.UnixNano())
		if err != nil {
			res.Errors++
			if res.FirstErr == "" {
				res.FirstErr = err.Error()
			}
		}
	}
	slices.Sort(calls)
	if len(calls) > 0 {
		res.CallP99 = calls[min(len(calls)-1, len(calls)*99/100)]
		res.CallMax = calls[len(calls)-1]
	}
	return res
}

// serverStats is /stats's answer from a server process.
type serverStats struct {
	CPUNanos int64 `json:"cpu_ns"`
}

// serverControl is the control mux every server under test (es, cf) has:
// /stats for its CPU time, /publish?n=&rate= to make changes through it.
func serverControl(cell *versionCell, notify notifyFunc) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, serverStats{CPUNanos: childproc.CPUNanos()}, nil)
	})
	mux.HandleFunc("/publish", func(w http.ResponseWriter, r *http.Request) {
		n, rate := intParam(r, "n", 0), floatParam(r, "rate", 0)
		if n <= 0 || n > 100000 || rate <= 0 {
			http.Error(w, "need 0 < n <= 100000 and rate > 0", http.StatusBadRequest)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), timeoutParam(r, time.Minute))
		defer cancel()
		writeJSON(w, publish(ctx, cell, notify, n, rate), nil)
	})
	return mux
}
