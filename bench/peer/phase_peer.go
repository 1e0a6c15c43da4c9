//go:build linux

package main

import (
	"context"
	"fmt"
	"slices"
)

// The peer phase: the systems side by side on one key, one server then
// two, the same rows and the same clients.

// result is one system's measurement of one row.
type result struct {
	servers int
	sys     system
	row     rowSpec
	measurement
}

// oneKey is the peer phase's subscription plan: every connection on
// entity 1.
func oneKey(clients int) openSpec {
	return openSpec{conns: clients, keys: 1, minSubs: clients, maxSubs: clients}
}

// runSystem starts sys's server process(es) and measures every row. With
// one server, it holds the clients and also takes the changes (entity-sync's
// in-process queue, Centrifuge's memory broker). With two, the clients are
// all on the first and the changes are made through the second, so each
// change crosses the broker (nsqd, Redis) between two processes.
func (o *orchestrator) runSystem(ctx context.Context, sys system, servers int, rows []rowSpec) {
	d, err := o.deploy(sys, servers)
	if err != nil {
		for _, row := range rows {
			r := result{servers: servers, sys: sys, row: row}
			r.err = "setup: " + err.Error()
			o.results = append(o.results, r)
		}
		progress("%s, %d server(s): %v", sys.name, servers, err)
		return
	}
	defer d.stop()
	for _, row := range rows {
		progress("%s, %d server(s), %s", sys.name, servers, row)
		r := result{servers: servers, sys: sys, row: row}
		r.measurement = o.runRow(ctx, d, row, fmt.Sprintf("peer-%s-%ds-%dc", sys.role, servers, row.clients), nil)
		if r.err != "" {
			progress("  %s", r.err)
		}
		o.results = append(o.results, r)
	}
}

// runRow opens row's clients on d's holder, all on entity 1, measures the
// row's changes and closes the clients.
func (o *orchestrator) runRow(ctx context.Context, d *deployment, row rowSpec, profile string, raw *breakdownRaw) measurement {
	_, closeAll, err := o.openClients(ctx, d, oneKey(row.clients))
	if err != nil {
		return measurement{err: "open: " + err.Error()}
	}
	defer closeAll()
	return o.measure(ctx, d, window{ids: slices.Repeat([]int{1}, row.changes), rate: row.rate, workers: 1, profile: profile, raw: raw})
}
