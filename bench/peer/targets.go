//go:build linux

package main

import (
	"fmt"
	"strings"
)

// The row targets for entity-sync, checked row by row from what this
// run measured (the design's own yardstick is printTarget's table):
//
//   - a visible p99 below Centrifuge's on every row;
//   - server CPU per delivered frame at most 1.25 x the floor's per frame,
//     on every row (the floor row with the same clients and changes);
//   - at 1,000 clients, CPU per (change x subscriber) at most 0.67 x
//     Centrifuge's;
//   - at 20 and 200 clients, at least 99% of the states delivered.
const (
	floorFactor    = 1.25
	cfFactor1000   = 0.67
	minDelivered   = 0.99
	deliveredUpTo  = 200  // rows with at most this many clients must deliver minDelivered
	cpuTargetsFrom = 1000 // rows with at least this many clients have the 0.67 x target
)

// printRowTargets writes one line per entity-sync row: each target's
// measured value and whether it is met ("–" where a target does not
// apply or a side is missing).
func (o *orchestrator) printRowTargets(b *strings.Builder) {
	floor := map[rowSpec]*floorResult{}
	for i := range o.floor {
		if o.floor[i].err == "" && o.floor[i].run.Frames > 0 {
			floor[o.floor[i].row] = &o.floor[i]
		}
	}
	type key struct {
		servers int
		row     rowSpec
	}
	cf := map[key]*result{}
	for i := range o.results {
		if r := &o.results[i]; r.sys.role == "cf" && r.err == "" {
			cf[key{r.servers, r.row}] = r
		}
	}
	b.WriteString("\n### entity-sync against its row targets\n\n")
	b.WriteString("| servers | clients | changes | visible p99 < Centrifuge's | CPU / frame ÷ floor's (≤ 1.25) | CPU / (change × subscriber) ÷ Centrifuge's (≤ 0.67 at 1,000 clients) | states delivered (≥ 99% at 20 and 200 clients) |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range o.results {
		if r.sys.role != "es" {
			continue
		}
		fmt.Fprintf(b, "| %d | %s | %g/s × %s | ", r.servers, commas(int64(r.row.clients)), r.row.rate, commas(int64(r.row.changes)))
		if r.err != "" || r.clients.Updates == 0 {
			b.WriteString("not measured | | | |\n")
			continue
		}
		c := cf[key{r.servers, r.row}]
		if c != nil {
			fmt.Fprintf(b, "%s vs %s: %s | ", ms(r.clients.P99), ms(c.clients.P99), yesNo(r.clients.P99 < c.clients.P99))
		} else {
			b.WriteString("– | ")
		}
		if f := floor[r.row]; f != nil && f.cpuNs > 0 {
			ratio := (float64(r.cpuNs) / float64(r.clients.Updates)) / (float64(f.cpuNs) / float64(f.run.Frames))
			fmt.Fprintf(b, "%.3f: %s | ", ratio, yesNo(ratio <= floorFactor))
		} else {
			b.WriteString("– | ")
		}
		if c != nil && c.cpuNs > 0 && r.row.clients >= cpuTargetsFrom {
			ratio := float64(r.cpuNs) / float64(c.cpuNs) // the same changes x subscribers on both sides
			fmt.Fprintf(b, "%.3f: %s | ", ratio, yesNo(ratio <= cfFactor1000))
		} else {
			b.WriteString("– | ")
		}
		share := float64(r.clients.Updates) / (float64(r.row.changes) * float64(r.row.clients))
		if r.row.clients <= deliveredUpTo {
			fmt.Fprintf(b, "%.1f%%: %s |\n", 100*share, yesNo(share >= minDelivered))
		} else {
			fmt.Fprintf(b, "%.1f%% (no target) |\n", 100*share)
		}
	}
}
