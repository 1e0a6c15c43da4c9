//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"
)

// The driver is the app's writers: it makes a row's changes by POSTing to
// the write endpoint of the server that publishes them (changeHandler), at
// a fixed rate, from the orchestrator process (so its CPU is in no server's
// count). Change i (entity ids[i]) is due at start + i/rate. Changes are
// spread over workers by entity, each worker making its changes in order,
// so one entity's changes are made one after the other, in order, as one
// database row's writes are; a worker whose request takes longer than the
// interval falls behind its schedule, which the result reports.

// driveResult is what the driver saw.
type driveResult struct {
	Changes  []change // the changes made, in the order they were due
	CallNs   []int64  // CallNs[i]: how long change i's write and notify took in its server
	Errors   int
	FirstErr string
	// How long the notify calls took, and how far the schedule slipped
	// because a request took longer than the interval.
	CallP99 int64
	CallMax int64
	SlipMax int64
}

// changeAnswer is changeHandler's answer.
type changeAnswer struct {
	V    int64 `json:"v"`
	At   int64 `json:"at"`
	Call int64 `json:"call"`
}

// drive makes one change per entry of ids, at rate per second, through
// the write endpoint at app (a base URL), from workers goroutines.
func drive(ctx context.Context, app string, ids []int, rate float64, workers int) driveResult {
	return driveQuery(ctx, app, "", ids, rate, workers)
}

// driveQuery is drive with extra query parameters ("noop=1&") for every
// request.
func driveQuery(ctx context.Context, app, extra string, ids []int, rate float64, workers int) driveResult {
	workers = max(1, workers)
	client := &http.Client{
		Transport: &http.Transport{MaxIdleConnsPerHost: workers, MaxConnsPerHost: workers, DisableCompression: true},
		Timeout:   30 * time.Second,
	}
	defer client.CloseIdleConnections()
	answers := make([]changeAnswer, len(ids))
	interval := time.Duration(float64(time.Second) / rate)
	begin := time.Now()
	var (
		mu  sync.Mutex
		res driveResult
		wg  sync.WaitGroup
	)
	fail := func(err error) {
		mu.Lock()
		res.Errors++
		if res.FirstErr == "" {
			res.FirstErr = err.Error()
		}
		mu.Unlock()
	}
	for w := range workers {
		wg.Go(func() {
			var slip int64
			for i, id := range ids {
				if id%workers != w {
					continue
				}
				due := begin.Add(time.Duration(i) * interval)
				if d := time.Until(due); d > 0 {
					time.Sleep(d)
				}
				if ctx.Err() != nil {
					fail(fmt.Errorf("cancelled at change %d of %d", i, len(ids)))
					return
				}
				slip = max(slip, int64(time.Since(due)))
				a, err := postChange(ctx, client, app, extra, id)
				if err != nil {
					fail(err)
					continue
				}
				answers[i] = a
			}
			mu.Lock()
			res.SlipMax = max(res.SlipMax, slip)
			mu.Unlock()
		})
	}
	wg.Wait()
	for i, a := range answers {
		if a.V == 0 {
			continue // failed, counted
		}
		res.Changes = append(res.Changes, change{ID: ids[i], V: a.V, At: a.At})
		res.CallNs = append(res.CallNs, a.Call)
	}
	calls := slices.Clone(res.CallNs)
	slices.Sort(calls)
	if len(calls) > 0 {
		res.CallP99 = calls[min(len(calls)-1, len(calls)*99/100)]
		res.CallMax = calls[len(calls)-1]
	}
	return res
}

func postChange(ctx context.Context, client *http.Client, app, extra string, id int) (changeAnswer, error) {
	var a changeAnswer
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, app+changePath+"?"+extra+"id="+strconv.Itoa(id), nil)
	if err != nil {
		return a, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return a, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return a, err
	}
	if resp.StatusCode != http.StatusOK {
		return a, fmt.Errorf("change %d: %s: %.200s", id, resp.Status, b)
	}
	if err := json.Unmarshal(b, &a); err != nil || a.V == 0 {
		return a, fmt.Errorf("change %d: answer %.200q: %v", id, b, err)
	}
	return a, nil
}

// lastVersions is each entity's newest version among changes: what every
// subscriber must hold in the end.
func lastVersions(changes []change) map[int]int64 {
	m := make(map[int]int64)
	for _, c := range changes {
		m[c.ID] = max(m[c.ID], c.V)
	}
	return m
}
