//go:build linux

package main

import (
	"context"
	"fmt"
	"net/url"
	"time"
)

// floorResult is the floor's measurement of one row.
type floorResult struct {
	row    rowSpec
	err    string
	cpuNs  int64
	frames int64 // bytes received by the clients / frame size
	run    floorRun
}

// runFloor measures the floor for every row: the same connection count
// and changes, in a floor server process of its own.
func (o *orchestrator) runFloor(ctx context.Context, rows []rowSpec) {
	fs, err := spawn("floor", 30*time.Second)
	if err != nil {
		for _, row := range rows {
			o.floor = append(o.floor, floorResult{row: row, err: err.Error()})
		}
		return
	}
	defer fs.Stop()
	for _, row := range rows {
		progress("floor, %s", row)
		r := o.runFloorRow(ctx, fs, row)
		if r.err != "" {
			progress("  %s", r.err)
		}
		o.floor = append(o.floor, r)
	}
}

func (o *orchestrator) runFloorRow(ctx context.Context, fs *child, row rowSpec) floorResult {
	res := floorResult{row: row}
	cl := o.clients.hello.Ctl
	var open openResult
	err := call(ctx, 60*time.Second, cl, "/floor/open", url.Values{"addr": {fs.hello.WS}, "n": {fmt.Sprint(row.clients)}}, nil, &open)
	defer func() { _ = call(context.Background(), 30*time.Second, cl, "/floor/close", nil, nil, nil) }()
	if err == nil && open.Errors > 0 {
		err = fmt.Errorf("%d of %d connections failed: %s", open.Errors, row.clients, open.FirstErr)
	}
	if err != nil {
		res.err = "open: " + err.Error()
		return res
	}
	var before, after serverStats
	if err := call(ctx, 10*time.Second, fs.hello.Ctl, "/stats", nil, nil, &before); err != nil {
		res.err = "stats: " + err.Error()
		return res
	}
	span := time.Duration(float64(row.changes) / row.rate * float64(time.Second))
	err = call(ctx, span+60*time.Second, fs.hello.Ctl, "/run", url.Values{
		"conns": {fmt.Sprint(row.clients)}, "n": {fmt.Sprint(row.changes)}, "rate": {fmt.Sprint(row.rate)},
	}, nil, &res.run)
	if err != nil {
		res.err = "run: " + err.Error()
		return res
	}
	frame := int64(len(floorFrame()))
	var fw floorWait
	waitErr := call(ctx, 32*time.Second, cl, "/floor/wait", url.Values{"bytes": {fmt.Sprint(int64(row.changes) * frame)}}, nil, &fw)
	if err := call(ctx, 10*time.Second, fs.hello.Ctl, "/stats", nil, nil, &after); err != nil {
		res.err = "stats: " + err.Error()
		return res
	}
	res.cpuNs = after.CPUNanos - before.CPUNanos
	res.frames = fw.Bytes / frame
	switch {
	case waitErr != nil:
		res.err = "wait: " + waitErr.Error()
	case !fw.OK:
		res.err = fmt.Sprintf("%d connections short of the last frame after 30 s", fw.Behind)
	case res.run.Errors > 0:
		res.err = fmt.Sprintf("%d write errors: %s", res.run.Errors, res.run.FirstErr)
	}
	return res
}
