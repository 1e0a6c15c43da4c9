//go:build linux

package main

import (
	"fmt"
	"strings"
)

// The targets for entity-sync, checked row by row from what this
// run measured, each against Centrifuge's row with the same servers and
// clients (or distribution) from the same run.
//
// One key (the peer phase, both entity-sync systems):
//   - visible p99 below Centrifuge's on every row;
//   - visible p50 below Centrifuge's on every row;
//   - at 1,000 clients, CPU per (change x subscriber) at most 0.67 x
//     Centrifuge's;
//   - at 20 and 200 clients, at least 99% of the states delivered.
//
// Many keys (the many-keys phase, both entity-sync systems):
//   - server CPU per change at most Centrifuge's;
//   - visible p50 and p99 below Centrifuge's;
//   - and the peer phase's one-key 20-client row at most 1.0 x
//     Centrifuge's CPU per (change x subscriber), below it on p50.
const (
	cfFactor1000   = 0.67
	minDelivered   = 0.99
	deliveredUpTo  = 200  // rows with at most this many clients must deliver minDelivered
	cpuTargetsFrom = 1000 // rows with at least this many clients have the 0.67 x target
	floorFactor    = 1.25 // CPU per frame against the floor's (shown, no longer a target)
	fewClients     = 20   // the many-keys targets' one-key row
	cfFactorFew    = 1.0
)

// ratio is a/b, printed with two decimals ("–" when b is not positive).
func ratio(a, b int64) string {
	if b <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", float64(a)/float64(b))
}

// measured says whether a measurement can be compared.
func measured(m *measurement) bool {
	return m != nil && m.err == "" && m.clients.Expected > 0 && m.clients.Updates > 0
}

// peerCF finds Centrifuge's peer result for servers and row.
func (o *orchestrator) peerCF(servers int, row rowSpec) *measurement {
	for i := range o.results {
		if r := &o.results[i]; r.sys.role == "cf" && r.servers == servers && r.row == row {
			return &r.measurement
		}
	}
	return nil
}

// printOneKeyTargets writes, per entity-sync peer row, the ratios to
// Centrifuge's row and each one-key target.
func (o *orchestrator) printOneKeyTargets(b *strings.Builder) {
	floor := map[rowSpec]*floorResult{}
	for i := range o.floor {
		if o.floor[i].err == "" && o.floor[i].run.Frames > 0 {
			floor[o.floor[i].row] = &o.floor[i]
		}
	}
	b.WriteString("\n### entity-sync ÷ Centrifuge, and the one-key targets\n\n")
	b.WriteString("| servers | clients | system | p50 ÷ cf | p99 ÷ cf | CPU / (change × subscriber) ÷ cf | CPU / frame ÷ floor | states delivered | p99 < cf | p50 < cf | CPU ≤ 0.67 × cf (1,000 clients) | ≥ 99% states (20, 200 clients) | all met |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for i := range o.results {
		r := &o.results[i]
		if !r.sys.isES() {
			continue
		}
		fmt.Fprintf(b, "| %d | %s | %s | ", r.servers, commas(int64(r.row.clients)), r.sys.name)
		cf := o.peerCF(r.servers, r.row)
		if !measured(&r.measurement) || !measured(cf) {
			b.WriteString("not comparable (a side is missing or failed) | | | | | | | | | |\n")
			continue
		}
		es, c := r.clients, cf.clients
		fl := "–"
		if f := floor[r.row]; f != nil && f.cpuNs > 0 {
			fl = fmt.Sprintf("%.2f", (float64(r.cpuNs)/float64(es.Updates))/(float64(f.cpuNs)/float64(f.run.Frames)))
		}
		// The same (change x subscriber) pairs on both sides, so the CPU
		// ratio is the ratio of the totals per pair.
		cpu := (float64(r.cpuNs) / float64(es.Expected)) / (float64(cf.cpuNs) / float64(c.Expected))
		share := float64(es.Updates) / float64(es.Expected)
		p99ok, p50ok := es.P99 < c.P99, es.P50 < c.P50
		all := p99ok && p50ok
		cpuMet := "–"
		if r.row.clients >= cpuTargetsFrom {
			cpuMet = yesNo(cpu <= cfFactor1000)
			all = all && cpu <= cfFactor1000
		}
		shareMet := "–"
		if r.row.clients <= deliveredUpTo {
			shareMet = yesNo(share >= minDelivered)
			all = all && share >= minDelivered
		}
		fmt.Fprintf(b, "%s (%s vs %s) | %s (%s vs %s) | %.2f | %s | %.1f%% | %s | %s | %s | %s | %s |\n",
			ratio(es.P50, c.P50), ms(es.P50), ms(c.P50), ratio(es.P99, c.P99), ms(es.P99), ms(c.P99),
			cpu, fl, 100*share, yesNo(p99ok), yesNo(p50ok), cpuMet, shareMet, metWord(all))
	}
}

// printManyKeyTargets writes, per entity-sync many-keys row, the ratios to
// Centrifuge's and the many-keys targets, then the one-key 20-client rows.
func (o *orchestrator) printManyKeyTargets(b *strings.Builder) {
	b.WriteString("\n### Many keys: entity-sync ÷ Centrifuge, and the many-keys targets\n\n")
	b.WriteString("| servers | keys picked | system | CPU / change ÷ cf (≤ 1) | p50 ÷ cf (< 1) | p99 ÷ cf (< 1) | allocations / change ÷ cf | all met |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for i := range o.many {
		r := &o.many[i]
		if !r.sys.isES() {
			continue
		}
		fmt.Fprintf(b, "| %d | %s | %s | ", r.servers, r.dist, r.sys.name)
		var cf *manyResult
		for j := range o.many {
			if c := &o.many[j]; c.sys.role == "cf" && c.servers == r.servers && c.dist == r.dist {
				cf = c
			}
		}
		if cf == nil || !measured(&r.measurement) || !measured(&cf.measurement) {
			b.WriteString("not comparable (a side is missing or failed) | | | | |\n")
			continue
		}
		es, c := r.clients, cf.clients
		cpu := (float64(r.cpuNs) / float64(len(r.drive.Changes))) / (float64(cf.cpuNs) / float64(len(cf.drive.Changes)))
		allocs := (float64(r.mallocs) / float64(len(r.drive.Changes))) / (float64(cf.mallocs) / float64(len(cf.drive.Changes)))
		met := cpu <= 1 && es.P50 < c.P50 && es.P99 < c.P99
		fmt.Fprintf(b, "%.2f: %s | %s (%s vs %s): %s | %s (%s vs %s): %s | %.2f | %s |\n",
			cpu, yesNo(cpu <= 1), ratio(es.P50, c.P50), ms(es.P50), ms(c.P50), yesNo(es.P50 < c.P50),
			ratio(es.P99, c.P99), ms(es.P99), ms(c.P99), yesNo(es.P99 < c.P99), allocs, metWord(met))
	}
	for i := range o.results {
		r := &o.results[i]
		if !r.sys.isES() || r.row.clients != fewClients {
			continue
		}
		cf := o.peerCF(r.servers, r.row)
		if !measured(&r.measurement) || !measured(cf) {
			continue
		}
		cpu := (float64(r.cpuNs) / float64(r.clients.Expected)) / (float64(cf.cpuNs) / float64(cf.clients.Expected))
		met := cpu <= cfFactorFew && r.clients.P50 < cf.clients.P50
		fmt.Fprintf(b, "| %d | one key, %d clients, %g/s × %s (peer) | %s | %.2f (per change × subscriber): %s | %s (%s vs %s): %s | – | – | %s |\n",
			r.servers, r.row.clients, r.row.rate, commas(int64(r.row.changes)), r.sys.name, cpu, yesNo(cpu <= cfFactorFew),
			ratio(r.clients.P50, cf.clients.P50), ms(r.clients.P50), ms(cf.clients.P50), yesNo(r.clients.P50 < cf.clients.P50), metWord(met))
	}
}

func metWord(b bool) string {
	if b {
		return "met"
	}
	return "not met"
}
