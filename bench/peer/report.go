//go:build linux

package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// print writes the tables and their legend to stdout.
func (o *orchestrator) print(total time.Duration, host hostSample) {
	end := readHost()
	var b strings.Builder
	b.WriteString("\n### Peer phase: entity-sync vs Centrifuge v0.40.1, one key\n\n")
	b.WriteString("| servers | clients | changes | system | updates delivered | websocket frames | server CPU / update | server CPU / (change × subscriber) | visible p50 | visible p99 |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range o.results {
		fmt.Fprintf(&b, "| %d | %s | %g/s × %s | %s | ", r.servers, commas(int64(r.row.clients)), r.row.rate, commas(int64(r.row.changes)), r.sys.name)
		if r.clients.Conns == 0 { // nothing measured
			fmt.Fprintf(&b, "ERROR: %s | | | | | |\n", oneLine(r.err))
			continue
		}
		full := int64(r.row.changes) * int64(r.row.clients)
		fmt.Fprintf(&b, "%s (%.1f%%) | %s | %s | %s | %s | %s |\n",
			commas(r.clients.Updates), 100*float64(r.clients.Updates)/float64(full), commas(r.clients.WSFrames),
			perUnit(r.cpuNs, r.clients.Updates), perUnit(r.cpuNs, full), ms(r.clients.P50), ms(r.clients.P99))
	}

	b.WriteString("\n### Floor phase: plain loopback TCP, one pre-encoded frame per connection per change\n\n")
	fmt.Fprintf(&b, "| clients | changes | frames delivered | server CPU / frame |\n| --- | --- | --- | --- |\n")
	for _, f := range o.floor {
		fmt.Fprintf(&b, "| %s | %g/s × %s | ", commas(int64(f.row.clients)), f.row.rate, commas(int64(f.row.changes)))
		if f.err != "" && f.run.Frames == 0 {
			fmt.Fprintf(&b, "ERROR: %s | |\n", oneLine(f.err))
			continue
		}
		full := int64(f.row.changes) * int64(f.row.clients)
		fmt.Fprintf(&b, "%s (%.1f%%) | %s |\n", commas(f.frames), 100*float64(f.frames)/float64(full), perUnit(f.cpuNs, f.run.Frames))
	}

	o.printTarget(&b)
	o.printRowTargets(&b)
	o.printNotes(&b)
	o.printBreakdown(&b)

	fmt.Fprintf(&b, "\ncommand: `%s`; %s %s/%s, GOMAXPROCS=%d, NumCPU=%d; total %.0f s\n",
		strings.Join(append([]string{"cd bench/peer && go run ."}, os.Args[1:]...), " "), runtime.Version(), runtime.GOOS, runtime.GOARCH,
		runtime.GOMAXPROCS(0), runtime.NumCPU(), total.Seconds())
	if span := end.total - host.total; span > 0 {
		fmt.Fprintf(&b, "host during the run: load average %s at start, %s at end; CPU busy %.0f%% of the %d cores' capacity "+
			"(other processes' load makes every number here worse)\n",
			host.loadavg, end.loadavg, 100*(end.busy-host.busy)/span, runtime.NumCPU())
	}
	fmt.Fprintf(&b, legend, len(floorFrame()))
	if len(o.breakdown) > 0 {
		b.WriteString(breakdownLegend)
	}
	fmt.Print(b.String())
}

// printTarget compares the two systems row by row with the design's
// yardstick (the project's design brief): entity-sync should have the lower visible
// p99 and at most two thirds of Centrifuge's server CPU per (change ×
// subscriber).
func (o *orchestrator) printTarget(b *strings.Builder) {
	type pair struct{ es, cf *result }
	var keys []string
	pairs := map[string]*pair{}
	for i := range o.results {
		r := &o.results[i]
		k := fmt.Sprintf("| %d | %s | %g/s × %s |", r.servers, commas(int64(r.row.clients)), r.row.rate, commas(int64(r.row.changes)))
		if pairs[k] == nil {
			pairs[k] = &pair{}
			keys = append(keys, k)
		}
		if r.sys.role == "es" {
			pairs[k].es = r
		} else {
			pairs[k].cf = r
		}
	}
	b.WriteString("\n### entity-sync against the design target (≤ 2/3 of Centrifuge's CPU per (change × subscriber), lower visible p99)\n\n")
	b.WriteString("| servers | clients | changes | CPU per (change × subscriber), entity-sync ÷ Centrifuge | visible p99, entity-sync vs Centrifuge | target met |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- |\n")
	for _, k := range keys {
		p := pairs[k]
		if p.es == nil || p.cf == nil || p.es.err != "" || p.cf.err != "" || p.cf.cpuNs <= 0 {
			fmt.Fprintf(b, "%s not comparable (a side is missing or failed) | | |\n", k)
			continue
		}
		ratio := float64(p.es.cpuNs) / float64(p.cf.cpuNs) // same changes × subscribers on both sides
		met := ratio <= 2.0/3 && p.es.clients.P99 < p.cf.clients.P99
		fmt.Fprintf(b, "%s %.2f | %s vs %s | %s |\n", k, ratio, ms(p.es.clients.P99), ms(p.cf.clients.P99), yesNo(met))
	}
}

// printNotes lists what went wrong or deserves a second look, per row.
func (o *orchestrator) printNotes(b *strings.Builder) {
	var lines []string
	for _, r := range o.results {
		what := fmt.Sprintf("%s, %d server(s), %s", r.sys.name, r.servers, r.row)
		if r.err != "" && r.clients.Conns > 0 {
			lines = append(lines, fmt.Sprintf("%s: %s (the row shows what was measured until then)", what, oneLine(r.err)))
		}
		c := r.clients
		if c.Dead > 0 || c.ReadErrors > 0 || c.Backwards > 0 || c.Missing > 0 {
			s := fmt.Sprintf("%s: %d connections lost, %d read errors, %d versions going backwards, %s (client, change) pairs never visible",
				what, c.Dead, c.ReadErrors, c.Backwards, commas(c.Missing))
			if c.FirstErr != "" {
				s += "; first error: " + oneLine(c.FirstErr)
			}
			lines = append(lines, s)
		}
		if interval := int64(float64(time.Second) / r.row.rate); r.pub.SlipMax > interval {
			lines = append(lines, fmt.Sprintf("%s: the publisher fell up to %s behind its schedule (a notify call took up to %s; p99 %s)",
				what, ms(r.pub.SlipMax), ms(r.pub.CallMax), ms(r.pub.CallP99)))
		}
	}
	for _, f := range o.floor {
		if f.err != "" && f.run.Frames > 0 {
			lines = append(lines, fmt.Sprintf("floor, %s: %s", f.row, oneLine(f.err)))
		}
	}
	lines = append(lines, o.notes...)
	if len(lines) > 0 {
		b.WriteString("\n")
		for _, l := range lines {
			fmt.Fprintf(b, "- note: %s\n", l)
		}
	}
}

// legend explains the tables; %d is the floor frame's size.
const legend = `
legend:
- servers 1: the clients' server also makes the changes: entity-sync with its in-process queue
  (entitysync.Config without NSQAddr), Centrifuge with its memory broker. servers 2: every client
  on one server, the changes made on the other and carried by an nsqd embedded in the
  orchestrator (entity-sync) or by the Redis at 127.0.0.1:6379 (Centrifuge's Redis broker). Each
  server is an OS process of its own, the clients are one more; the brokers' CPU is in neither.
- clients: plain gorilla/websocket connections and one read loop for both systems: entity-sync's
  raw dialect (a subscribe request, then each row is its own text frame), Centrifuge's JSON
  protocol without a client library (a connect command; the server subscribes the connection in
  OnConnecting). The same payload, {"entity":"bench","id":"1","v":N}; each library's defaults.
- changes: rate x count, one key; the 100/s row makes 500 changes (5 s), not 1,000, to keep the
  peer phase near a minute and a half.
- updates delivered: messages carrying one of the row's versions, as a share of changes x
  clients. entity-sync's latest-wins replaces an update a client has not been sent yet with the
  newer one; Centrifuge sends every one, batching up to 16 queued messages into one websocket
  frame (the websocket frames column).
- server CPU: getrusage(RUSAGE_SELF) user+sys of the process holding the clients' server, from
  just before the first change until every client holds the last one; per update delivered, and
  per change x subscriber (the work asked for: the same for both systems).
- visible p50/p99: over every (client, change), the receive time of the client's first message
  with a version >= the change's, minus the moment the change was made and notified (a skipped
  state becomes visible with the newer one); wall clock (UnixNano) of this one machine.
- floor: a plain TCP server with as many connections writes the same pre-encoded %d-byte
  websocket frame (an entity-sync update's size) to each, per change, from GOMAXPROCS
  goroutines: little more than the write system calls.
- design target: entity-sync should have the lower visible p99 and at most 2/3 of
  Centrifuge's server CPU per (change x subscriber).
- row targets: per entity-sync row, its visible p99 against Centrifuge's in the same row; its server
  CPU per update delivered divided by the floor's server CPU per frame for the same clients and
  changes; at 1,000 clients its CPU per (change x subscriber) divided by Centrifuge's; at 20 and
  200 clients the share of (change x client) states delivered.
`

// hostSample is what the machine as a whole was doing.
type hostSample struct {
	loadavg     string
	busy, total float64 // CPU seconds since boot, all cores (/proc/stat)
}

func readHost() hostSample {
	var h hostSample
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) >= 3 {
			h.loadavg = strings.Join(f[:3], " ")
		}
	}
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := strings.Cut(string(b), "\n")
		for i, v := range strings.Fields(line)[1:] {
			n, _ := strconv.ParseFloat(v, 64)
			h.total += n
			if i != 3 && i != 4 { // idle, iowait
				h.busy += n
			}
		}
	}
	return h
}

func perUnit(ns, n int64) string {
	if n <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f µs", float64(ns)/1000/float64(n))
}

func ms(ns int64) string { return fmt.Sprintf("%.2f ms", float64(ns)/1e6) }

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// commas writes n with thousands separators.
func commas(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var out []byte
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	if neg {
		return "-" + string(out)
	}
	return string(out)
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	s = strings.ReplaceAll(s, "|", "/")
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}
