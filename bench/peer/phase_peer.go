//go:build linux

package main

import (
	"context"
	"fmt"
	"net/url"
	"time"
)

// The peer phase: entity-sync and Centrifuge, one server then two, the
// same rows and the same clients.

// result is one system's measurement of one row.
type result struct {
	servers int
	sys     system
	row     rowSpec
	err     string // why the row has no (or a partial) measurement

	cpuNs   int64 // CPU of the process holding the clients' server
	clients rowResult
	pub     publishResult
}

// runSystem starts sys's server process(es) and measures every row. With
// one server, it holds the clients and is also the publisher (entity-sync's
// in-process queue, Centrifuge's memory broker). With two, the clients are
// all on the first and the changes are published through the second, so
// each change crosses the broker (nsqd, Redis) between two processes.
func (o *orchestrator) runSystem(ctx context.Context, sys system, servers int, rows []rowSpec) {
	args := []string{"-cell", o.cell}
	if servers == 2 {
		switch sys.role {
		case "es":
			args = append(args, "-nsqd", o.nsqd)
		case "cf":
			args = append(args, "-redis-addr", o.cfg.redis, "-prefix", o.prefix)
		}
	}
	if o.cfg.verbose {
		args = append(args, "-v")
	}
	failAll := func(err error) {
		for _, row := range rows {
			o.results = append(o.results, result{servers: servers, sys: sys, row: row, err: "setup: " + err.Error()})
		}
		progress("%s, %d server(s): %v", sys.name, servers, err)
	}
	holder, err := spawn(sys.role, 30*time.Second, args...)
	if err != nil {
		failAll(err)
		return
	}
	defer holder.Stop()
	publisher := holder
	if servers == 2 {
		if publisher, err = spawn(sys.role, 30*time.Second, args...); err != nil {
			failAll(err)
			return
		}
		defer publisher.Stop()
	}
	for _, row := range rows {
		progress("%s, %d server(s), %s", sys.name, servers, row)
		r := o.runRow(ctx, sys, holder, publisher, row, nil)
		r.servers = servers
		if r.err != "" {
			progress("  %s", r.err)
		}
		o.results = append(o.results, r)
	}
}

// runRow measures one row: open the clients on holder and wait until each
// is subscribed; one warm-up change through the whole path (not measured);
// then record, make the row's changes through publisher at its rate, wait
// until every client holds the last one, and collect the clients' frames
// and visible latencies and holder's CPU time over that window. With raw
// (the breakdown phase; holder runs with -stamp), it also records holder's
// rounds and socket writes over the window and collects them with every
// client's arrivals into raw.
func (o *orchestrator) runRow(ctx context.Context, sys system, holder, publisher *child, row rowSpec, raw *breakdownRaw) result {
	res := result{sys: sys, row: row}
	cl := o.clients.hello.Ctl
	var open openResult
	err := call(ctx, 90*time.Second, cl, "/open", url.Values{"proto": {sys.role}, "url": {holder.hello.WS}, "n": {fmt.Sprint(row.clients)}}, nil, &open)
	defer func() {
		if err := call(context.Background(), 30*time.Second, cl, "/close", nil, nil, nil); err != nil {
			o.note("closing %s clients: %v", sys.name, err)
		}
	}()
	if err == nil && open.Errors > 0 {
		err = fmt.Errorf("%d of %d connections failed: %s", open.Errors, row.clients, open.FirstErr)
	}
	if err != nil {
		res.err = "open: " + err.Error()
		return res
	}

	// The warm-up also proves the path: a subscription the broker has not
	// set up yet (Centrifuge subscribes to Redis on the first client) loses
	// a change, so it is retried a few times before the row fails.
	var wr waitResult
	for try := 1; ; try++ {
		var warm publishResult
		err = call(ctx, 10*time.Second, publisher.hello.Ctl, "/publish", url.Values{"n": {"1"}, "rate": {"1"}}, nil, &warm)
		if err == nil {
			err = call(ctx, 5*time.Second, cl, "/wait", url.Values{"v": {fmt.Sprint(warm.FirstV)}}, nil, &wr)
		}
		if err == nil && !wr.OK {
			err = fmt.Errorf("%d clients behind, %d dead", wr.Behind, wr.Dead)
		}
		if err == nil || try == 5 || ctx.Err() != nil {
			break
		}
	}
	if err != nil {
		res.err = "warm-up change: " + err.Error()
		return res
	}

	var before, after serverStats
	if err := call(ctx, 10*time.Second, cl, "/record", nil, nil, nil); err != nil {
		res.err = "record: " + err.Error()
		return res
	}
	if err := call(ctx, 10*time.Second, holder.hello.Ctl, "/stats", nil, nil, &before); err != nil {
		res.err = "stats: " + err.Error()
		return res
	}
	if raw != nil {
		if err := call(ctx, 10*time.Second, holder.hello.Ctl, "/stamps/record", nil, nil, nil); err != nil {
			res.err = "stamps: " + err.Error()
			return res
		}
	}
	span := time.Duration(float64(row.changes) / row.rate * float64(time.Second))
	err = call(ctx, span+60*time.Second, publisher.hello.Ctl, "/publish",
		url.Values{"n": {fmt.Sprint(row.changes)}, "rate": {fmt.Sprint(row.rate)}}, nil, &res.pub)
	if err == nil && res.pub.Errors > 0 {
		err = fmt.Errorf("%d notify errors: %s", res.pub.Errors, res.pub.FirstErr)
	}
	if err != nil || len(res.pub.NotifyNs) == 0 {
		res.err = fmt.Sprintf("publish: %v", err)
		return res
	}
	lastV := res.pub.FirstV + int64(len(res.pub.NotifyNs)) - 1
	waitErr := call(ctx, 62*time.Second, cl, "/wait", url.Values{"v": {fmt.Sprint(lastV)}}, nil, &wr)
	if err := call(ctx, 10*time.Second, holder.hello.Ctl, "/stats", nil, nil, &after); err != nil {
		res.err = "stats: " + err.Error()
		return res
	}
	res.cpuNs = after.CPUNanos - before.CPUNanos
	req := resultRequest{FirstV: res.pub.FirstV, NotifyNs: res.pub.NotifyNs}
	if err := call(ctx, 60*time.Second, cl, "/result", nil, req, &res.clients); err != nil {
		res.err = "result: " + err.Error()
		return res
	}
	if raw != nil {
		if err := call(ctx, 30*time.Second, holder.hello.Ctl, "/stamps/result", nil, nil, &raw.stamps); err != nil {
			res.err = "stamps: " + err.Error()
			return res
		}
		if err := call(ctx, 30*time.Second, cl, "/arrivals", nil, nil, &raw.arrivals); err != nil {
			res.err = "arrivals: " + err.Error()
			return res
		}
	}
	switch {
	case waitErr != nil:
		res.err = "waiting for the last change: " + waitErr.Error()
	case !wr.OK:
		res.err = fmt.Sprintf("not converged after %.0f s: %d clients behind (lowest at v%d of v%d), %d dead",
			wr.Ms/1000, wr.Behind, wr.MinV, lastV, wr.Dead)
	}
	return res
}
