//go:build linux

package main

import (
	"cmp"
	"context"
	"fmt"
	"math"
	"slices"
	"strings"
)

// The breakdown phase: entity-sync alone (the seed path), at a low rate, with one server
// (in-process queue) and with two through nsqd, its latency split into the
// stages a change goes through. The publisher times each notify call; the
// server holding the clients runs with -stamp (stamp.go): the bridge
// reports every fetch round through esbridge.Options.OnRound (when the
// notification came from the queue, when the fetch started and ended, when
// the fan-out ended) and every socket write is timestamped; the clients
// timestamp every frame they read. All are wall-clock UnixNano times of
// this one machine, joined here by version (change) and by client address.

// defaultBreakdown is the breakdown's row: 20 clients, 20 changes/s for 5 s.
const defaultBreakdown = "20:20:100"

// breakdownRaw is what the breakdown row collects besides the peer row's
// result: the server's rounds and socket writes, and the clients'
// arrivals by client address.
type breakdownRaw struct {
	stamps   stampsResult
	arrivals map[string][][2]int64 // client address -> (version, UnixNano)
}

// The stages, in the order a change goes through them.
const (
	stNotifyCall = iota
	stQueue
	stToFetch
	stFetch
	stFirstWrite
	stFanOut
	stDelivered
	stSocket
	stLastClient
	stTotal
	stageCount
)

var stageNames = [stageCount]string{
	stNotifyCall: "1. notify call: start → return (write + NotifyAllOfChange in the app's HTTP handler, publishing server)",
	stQueue:      "2. notify start → server received it from the queue (Round.Notified)",
	stToFetch:    "3. received → fetch start (Round.Started)",
	stFetch:      "4. fetch start → fetch end (Round.Fetched)",
	stFirstWrite: "5. fetch end → first frame written (first socket write of the round)",
	stFanOut:     "6. first → last frame written (last socket write of the round)",
	stDelivered:  "(5+6 as OnRound sees it: fetch end → Round.Delivered)",
	stSocket:     "7. frame written → that client read it (per client)",
	stLastClient: "8. last frame written → last client read it",
	stTotal:      "total: notify start → client read it (per client)",
}

// breakdownInfo says how much of the row the stages cover.
type breakdownInfo struct {
	changes   int // changes the row made
	rounds    int // rounds attributed to one of the row's changes
	coalesced int // changes without a round of their own (a later round covered them)
	ambiguous int // rounds whose fetch read a change newer than the notification they answered (left out)
	written   int // (client, round) pairs with a socket write in the round
	read      int // of which the client read that exact version
}

// breakdownResult is one topology's breakdown.
type breakdownResult struct {
	servers int
	row     rowSpec
	err     string
	peer    result // the row as the peer table would show it
	stages  [stageCount][]int64
	info    breakdownInfo
}

// runBreakdown measures the breakdown row with one entity-sync server, then
// with two through nsqd (unless -one-server-only).
func (o *orchestrator) runBreakdown(ctx context.Context, spec string) {
	rows, err := parseRows(spec)
	if err == nil && len(rows) != 1 {
		err = fmt.Errorf("want one row, got %d", len(rows))
	}
	if err != nil {
		o.note("breakdown: -breakdown %q: %v", spec, err)
		o.breakdownFailed = true
		return
	}
	row := rows[0]
	for servers := 1; servers <= 2; servers++ {
		if servers == 2 && o.cfg.skipTwo {
			break
		}
		progress("breakdown, entity-sync, %d server(s), %s", servers, row)
		b := o.breakdownRow(ctx, servers, row)
		if b.err != "" {
			progress("  %s", b.err)
		}
		o.breakdown = append(o.breakdown, b)
	}
}

func (o *orchestrator) breakdownRow(ctx context.Context, servers int, row rowSpec) breakdownResult {
	b := breakdownResult{servers: servers, row: row}
	d, err := o.deploy(allSystems[0], servers, "-stamp")
	if err != nil {
		b.err = "setup: " + err.Error()
		return b
	}
	defer d.stop()
	var raw breakdownRaw
	b.peer = result{servers: servers, sys: allSystems[0], row: row}
	b.peer.measurement = o.runRow(ctx, d, row, "", &raw)
	if b.err = b.peer.err; b.err != "" {
		return b
	}
	changes := b.peer.drive.Changes
	notify := make([]int64, len(changes))
	for i, c := range changes {
		if c.V != changes[0].V+int64(i) {
			b.err = fmt.Sprintf("change %d made version %d, not %d: the key changed elsewhere", i, c.V, changes[0].V+int64(i))
			return b
		}
		notify[i] = c.At
	}
	b.stages, b.info = computeBreakdown(changes[0].V, notify, b.peer.drive.CallNs, raw)
	if b.info.rounds == 0 {
		b.err = "no round could be attributed to a change"
	}
	return b
}

// computeBreakdown joins the publisher's notify times (change firstV+i
// notified at notifyNs[i], the call taking callNs[i]), the server's rounds
// and socket writes and the clients' arrivals into per-stage samples.
//
// A round is attributed to the change whose version its fetch read. A round
// whose notification came from the queue before that change was even
// notified answered an older change, its fetch reading a newer one: it is
// left out (counted as ambiguous). A round's socket write on a connection
// is the first write to it from the round's fetch end until the next
// round's; the client's read is its first arrival of that exact version.
func computeBreakdown(firstV int64, notifyNs, callNs []int64, raw breakdownRaw) (st [stageCount][]int64, info breakdownInfo) {
	info.changes = len(notifyNs)
	st[stNotifyCall] = append(st[stNotifyCall], callNs...)

	rounds := slices.Clone(raw.stamps.Rounds)
	slices.SortFunc(rounds, func(a, b roundRec) int { return cmp.Compare(a.Started, b.Started) })
	writes := make(map[string][]int64, len(raw.stamps.Writes))
	for addr, w := range raw.stamps.Writes {
		w = slices.Clone(w)
		slices.Sort(w)
		writes[addr] = w
	}
	// Each client's first read of each version.
	reads := make(map[string]map[int64]int64, len(raw.arrivals))
	for addr, as := range raw.arrivals {
		m := make(map[int64]int64, len(as))
		for _, a := range as {
			if _, ok := m[a[0]]; !ok {
				m[a[0]] = a[1]
			}
		}
		reads[addr] = m
	}

	own := make(map[int64]bool)
	for k, r := range rounds {
		i := r.V - firstV
		if r.Notified == 0 || i < 0 || i >= int64(len(notifyNs)) {
			continue // a round no notification of the row asked for
		}
		notified := notifyNs[i]
		if r.Notified < notified {
			info.ambiguous++
			continue
		}
		info.rounds++
		own[r.V] = true
		st[stQueue] = append(st[stQueue], r.Notified-notified)
		st[stToFetch] = append(st[stToFetch], r.Started-r.Notified)
		st[stFetch] = append(st[stFetch], r.Fetched-r.Started)
		st[stDelivered] = append(st[stDelivered], r.Delivered-r.Fetched)

		end := int64(math.MaxInt64)
		if k+1 < len(rounds) {
			end = rounds[k+1].Fetched
		}
		first, last, lastRead := int64(math.MaxInt64), int64(0), int64(0)
		for addr, w := range writes {
			if _, client := reads[addr]; !client {
				// Not a subscriber's connection: with one server it is the
				// writer's HTTP connection, whose next response would
				// otherwise count as this round's last frame.
				continue
			}
			j, _ := slices.BinarySearch(w, r.Fetched)
			if j == len(w) || w[j] >= end {
				continue
			}
			at := w[j]
			info.written++
			first, last = min(first, at), max(last, at)
			if got, ok := reads[addr][r.V]; ok {
				info.read++
				st[stSocket] = append(st[stSocket], got-at)
				st[stTotal] = append(st[stTotal], got-notified)
				lastRead = max(lastRead, got)
			}
		}
		if last == 0 {
			continue
		}
		st[stFirstWrite] = append(st[stFirstWrite], first-r.Fetched)
		st[stFanOut] = append(st[stFanOut], last-first)
		if lastRead > 0 {
			st[stLastClient] = append(st[stLastClient], lastRead-last)
		}
	}
	info.coalesced = len(notifyNs) - len(own)
	return st, info
}

// printBreakdown writes the breakdown table: one pair of columns (p50,
// p99) per topology.
func (o *orchestrator) printBreakdown(b *strings.Builder) {
	if len(o.breakdown) == 0 {
		return
	}
	row := o.breakdown[0].row
	fmt.Fprintf(b, "\n### Latency breakdown: entity-sync, %s clients on one key, %g changes/s × %s\n\n",
		commas(int64(row.clients)), row.rate, commas(int64(row.changes)))
	b.WriteString("| stage |")
	for _, r := range o.breakdown {
		fmt.Fprintf(b, " %s p50 | p99 |", topology(r.servers))
	}
	b.WriteString("\n| --- |")
	for range o.breakdown {
		b.WriteString(" --- | --- |")
	}
	b.WriteString("\n")
	for s := range stageCount {
		fmt.Fprintf(b, "| %s |", stageNames[s])
		for _, r := range o.breakdown {
			if r.err != "" {
				b.WriteString(" – | – |")
				continue
			}
			samples := slices.Clone(r.stages[s])
			p50, p99, _ := percentiles(samples)
			if len(samples) == 0 {
				b.WriteString(" – | – |")
				continue
			}
			fmt.Fprintf(b, " %s | %s |", ms3(p50), ms3(p99))
		}
		b.WriteString("\n")
	}
	b.WriteString("\n")
	for _, r := range o.breakdown {
		if r.err != "" {
			fmt.Fprintf(b, "- %s: ERROR: %s\n", topology(r.servers), oneLine(r.err))
			continue
		}
		i := r.info
		fmt.Fprintf(b, "- %s: %d changes; %d rounds attributed (%d changes covered by a later round, %d rounds left out as ambiguous); "+
			"%s (client, round) socket writes, %s read back as that exact version; visible p50 %s / p99 %s as the peer table counts it\n",
			topology(r.servers), i.changes, i.rounds, i.coalesced, i.ambiguous, commas(int64(i.written)), commas(int64(i.read)),
			ms(r.peer.clients.P50), ms(r.peer.clients.P99))
	}
}

func topology(servers int) string {
	if servers == 1 {
		return "1 server (in-process queue)"
	}
	return "2 servers (nsqd)"
}

// ms3 prints a duration in ms with three decimals: the stages are often
// tens of microseconds.
func ms3(ns int64) string { return fmt.Sprintf("%.3f ms", float64(ns)/1e6) }

// breakdownLegend explains the breakdown table.
const breakdownLegend = `
breakdown legend:
- one row, entity-sync only: 1 server = the clients' server also publishes, through its
  in-process queue; 2 servers = every client on one server, the changes published by the other
  and carried by nsqd (a process of its own). Each server is its own OS process, the clients another.
- times are wall clock (UnixNano) of this one machine, taken in three processes: the publisher
  (notify call start, the zero point, and its duration), the clients' server (esbridge
  Options.OnRound: Notified, Started, Fetched, Delivered; and a timestamp after every write to a
  client's socket, from a listener wrapper that keeps entity-sync's direct-write path) and the
  clients (the time each frame was read).
- a round is attributed to the change whose version its fetch read; per stage, p50 and p99 over
  the attributed rounds (stages 2-6, 8) or over (client, round) pairs (7, total). Stage 1 is
  over every change. At this rate nearly every change has a round of its own.
- stages 5-6 and 8 use the instrumented socket writes; OnRound's Delivered (the row in
  parentheses) is when the fan-out returned, after the last write.
`
