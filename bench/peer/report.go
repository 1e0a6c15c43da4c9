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
	if len(o.results) > 0 {
		o.printPeer(&b)
		o.printOneKeyTargets(&b)
	}
	if len(o.floor) > 0 {
		o.printFloor(&b)
	}
	if len(o.many) > 0 {
		o.printMany(&b)
		o.printManyKeyTargets(&b)
	}
	o.printNotes(&b)
	o.printBreakdown(&b)
	o.printProfiles(&b)

	fmt.Fprintf(&b, "\ncommand: `%s`; %s %s/%s, GOMAXPROCS=%d, NumCPU=%d; total %.0f s\n",
		strings.Join(append([]string{"cd bench/peer && go run ."}, os.Args[1:]...), " "), runtime.Version(), runtime.GOOS, runtime.GOARCH,
		runtime.GOMAXPROCS(0), runtime.NumCPU(), total.Seconds())
	if span := end.total - host.total; span > 0 {
		fmt.Fprintf(&b, "host during the run: load average %s at start, %s at end; CPU busy %.0f%% of the %d cores' capacity "+
			"(other processes' load makes every number here worse)\n",
			host.loadavg, end.loadavg, 100*(end.busy-host.busy)/span, runtime.NumCPU())
	}
	fmt.Fprintf(&b, legend, len(floorFrame()))
	if len(o.many) > 0 {
		b.WriteString(manyLegend)
	}
	if len(o.breakdown) > 0 {
		b.WriteString(breakdownLegend)
	}
	fmt.Print(b.String())
}

// printPeer writes the peer phase's table: one line per server count,
// row and system.
func (o *orchestrator) printPeer(b *strings.Builder) {
	b.WriteString("\n### Peer phase: entity-sync (seed API, New+Register) vs Centrifuge v0.40.1, one key\n\n")
	b.WriteString("| servers | clients | changes | system | updates delivered | websocket frames | server CPU / update | server CPU / (change × subscriber) | visible p50 | visible p99 |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range o.results {
		fmt.Fprintf(b, "| %d | %s | %g/s × %s | %s | ", r.servers, commas(int64(r.row.clients)), r.row.rate, commas(int64(r.row.changes)), r.sys.name)
		c := r.clients
		if c.Conns == 0 || c.Expected == 0 { // nothing measured
			fmt.Fprintf(b, "ERROR: %s | | | | | |\n", oneLine(r.err))
			continue
		}
		fmt.Fprintf(b, "%s (%.1f%%) | %s | %s | %s | %s | %s |\n",
			commas(c.Updates), pct(c.Updates, c.Expected), commas(c.WSFrames),
			perUnit(r.cpuNs, c.Updates), perUnit(r.cpuNs, c.Expected), ms(c.P50), ms(c.P99))
	}
}

// printFloor writes the floor phase's table.
func (o *orchestrator) printFloor(b *strings.Builder) {
	b.WriteString("\n### Floor phase: plain loopback TCP, one pre-encoded frame per connection per change\n\n")
	fmt.Fprintf(b, "| clients | changes | frames delivered | server CPU / frame |\n| --- | --- | --- | --- |\n")
	for _, f := range o.floor {
		fmt.Fprintf(b, "| %s | %g/s × %s | ", commas(int64(f.row.clients)), f.row.rate, commas(int64(f.row.changes)))
		if f.err != "" && f.run.Frames == 0 {
			fmt.Fprintf(b, "ERROR: %s | |\n", oneLine(f.err))
			continue
		}
		full := int64(f.row.changes) * int64(f.row.clients)
		fmt.Fprintf(b, "%s (%.1f%%) | %s |\n", commas(f.frames), pct(f.frames, full), perUnit(f.cpuNs, f.run.Frames))
	}
}

// printMany writes the many-keys phase's table.
func (o *orchestrator) printMany(b *strings.Builder) {
	mc := o.cfg.many
	fmt.Fprintf(b, "\n### Many keys: %s keys, %d-%d subscribers each over %s connections, %g changes/s × %s per distribution\n\n",
		commas(int64(mc.keys)), mc.minSubs, mc.maxSubs, commas(int64(mc.conns)), mc.rate, commas(int64(mc.changes)))
	b.WriteString("| servers | keys picked | system | deliveries | server CPU / change | of which the write endpoint | server CPU / delivery | allocations / change | fetches / change | visible p50 | visible p99 |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range o.many {
		fmt.Fprintf(b, "| %d | %s | %s | ", r.servers, r.dist, r.sys.name)
		c := r.clients
		if c.Conns == 0 || c.Expected == 0 {
			fmt.Fprintf(b, "ERROR: %s | | | | | | | |\n", oneLine(r.err))
			continue
		}
		changes := int64(len(r.drive.Changes))
		fetches := "–"
		if r.sys.isES() && changes > 0 {
			fetches = fmt.Sprintf("%.2f", float64(r.fetches)/float64(changes))
		}
		endpoint := "–"
		if r.endpointNs > 0 {
			endpoint = perUnit(r.endpointNs, 1)
		}
		fmt.Fprintf(b, "%s of %s (%.1f%%) | %s | %s | %s | %s | %s | %s | %s |\n",
			commas(c.Updates), commas(c.Expected), pct(c.Updates, c.Expected),
			perUnit(r.cpuNs, changes), endpoint, perUnit(r.cpuNs, c.Updates), perCount(r.mallocs, changes), fetches, ms(c.P50), ms(c.P99))
	}
}

// printNotes lists what went wrong or deserves a second look, per row.
func (o *orchestrator) printNotes(b *strings.Builder) {
	var lines []string
	check := func(what string, m measurement, interval int64) {
		if m.err != "" && m.clients.Conns > 0 {
			lines = append(lines, fmt.Sprintf("%s: %s (the row shows what was measured until then)", what, oneLine(m.err)))
		}
		c := m.clients
		if c.Dead > 0 || c.ReadErrors > 0 || c.Backwards > 0 || c.Missing > 0 || c.Strays > 0 {
			s := fmt.Sprintf("%s: %d connections lost, %d read errors, %d versions going backwards, %d messages for keys not subscribed, %s (subscriber, change) pairs never visible",
				what, c.Dead, c.ReadErrors, c.Backwards, c.Strays, commas(c.Missing))
			if c.FirstErr != "" {
				s += "; first error: " + oneLine(c.FirstErr)
			}
			lines = append(lines, s)
		}
		if m.drive.SlipMax > interval {
			lines = append(lines, fmt.Sprintf("%s: the writers fell up to %s behind their schedule (a write + notify took up to %s; p99 %s)",
				what, ms(m.drive.SlipMax), ms(m.drive.CallMax), ms(m.drive.CallP99)))
		}
	}
	for _, r := range o.results {
		check(fmt.Sprintf("%s, %d server(s), %s", r.sys.name, r.servers, r.row), r.measurement, int64(float64(time.Second)/r.row.rate))
	}
	for _, r := range o.many {
		// The many-keys writers are several: a slip under a few intervals
		// is the schedule's granularity, not a backlog.
		check(fmt.Sprintf("many keys, %s, %d server(s), %s", r.sys.name, r.servers, r.dist), r.measurement, int64(5*time.Millisecond))
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
- systems: "entity-sync seed API" is entity-sync used exactly as the seed's README does: es.Setup
  on a gorilla/mux router, RegisterEntityAndDBHandler with the secret-taking handler (every
  client has the same empty secret: one handler call per change per server), raw dialect.
  "entity-sync New+Register" is the current API: entitysync.New, Register with a fetch function,
  the envelope dialect (entitysync.v1) its client libraries speak. Each library's defaults.
- changes: every system's changes arrive as HTTP POSTs to the app's write endpoint on the
  system's own router and listener, whose handler writes the entity's new version (a shared
  memory cell standing for the database) and calls NotifyAllOfChange (entity-sync) or Publish
  (Centrifuge); the requests come from the orchestrator process at a fixed rate.
- servers 1: the clients' server also takes the changes: entity-sync with its in-process queue,
  Centrifuge with its memory broker. servers 2: every client on one server, the changes made on
  the other and carried by nsqd v1.3.0 in a process of its own (entity-sync) or by the Redis at
  127.0.0.1:6379 (Centrifuge's Redis broker). Each server is an OS process of its own, the
  clients are one more; the brokers' CPU is in none.
- clients: plain gorilla/websocket connections and one read loop for every system: entity-sync's
  raw dialect (a subscribe request per key, then each row is its own text frame) or envelope
  dialect (a welcome, then per subscribe an ack and a rows frame; every change a rows frame),
  Centrifuge's JSON protocol without a client library (a connect command naming the keys; the
  server subscribes the connection to their channels in OnConnecting). The same payload,
  {"entity":"bench","id":"1","v":N}.
- updates delivered: messages carrying one of the row's versions, as a share of the
  (subscriber, change) pairs. entity-sync's latest-wins replaces an update a client has not been
  sent yet with the newer one; Centrifuge sends every one, batching queued messages into one
  websocket frame (the websocket frames column).
- server CPU: getrusage(RUSAGE_SELF) user+sys of every server process of the system (with two
  servers, both), from just before the first change until every client holds the last one; per
  update delivered, and per (change x subscriber) (the work asked for: the same for every system).
  It includes the HTTP handler that takes each change, the same for every system.
- visible p50/p99: over every (subscriber, change), the receive time of the client's first message
  with a version >= the change's, minus the moment the change was made (in the write handler,
  before the write); a skipped state becomes visible with the newer one; wall clock of this one
  machine.
- floor: a plain TCP server with as many connections writes the same pre-encoded %d-byte
  websocket frame (an entity-sync update's size) to each, per change, from GOMAXPROCS
  goroutines: little more than the write system calls.
- one-key targets, per entity-sync row: visible p99 below Centrifuge's on every row; p50 below
  Centrifuge's on every row; at 1,000 clients CPU per (change x subscriber) at most 0.67 x
  Centrifuge's; at 20 and 200 clients at least 99%% of the states delivered.
`

// manyLegend explains the many-keys tables.
const manyLegend = `
many-keys legend:
- the subscriptions: every key gets a uniform 1-5 (-mk-subs) subscribers on distinct connections
  picked at random (the same plan for every system); a connection holds ~30 keys.
- keys picked: zipf draws each change's key with weight 1/rank^1.1 (ranks shuffled over the
  keys), uniform draws it uniformly; the same sequence for every system. The changes are made
  by 8 concurrent writers (-mk-workers), one key's changes always by the same one, in order.
- server CPU / change: all server processes' CPU over the window divided by the changes made;
  / delivery: divided by the messages delivered. allocations / change: runtime.MemStats.Mallocs
  of all server processes over the window, per change. fetches / change: calls of the app's
  fetch function (entity-sync; one per change per server is the guarantee).
- of which the write endpoint: the CPU per change of the same server taking the same rate of
  requests with nothing notified (the HTTP request and the version write), measured for 0.5 s on
  each deployment before its windows: the part of server CPU / change every system pays alike.
- many-keys targets, per entity-sync row: server CPU per change at most Centrifuge's, visible
  p50 and p99 below Centrifuge's; and the peer phase's one-key 20-client row at most 1.0 x
  Centrifuge's CPU per (change x subscriber), below it on p50.
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

func perCount(n, per int64) string {
	if per <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f", float64(n)/float64(per))
}

func pct(n, of int64) float64 {
	if of <= 0 {
		return 0
	}
	return 100 * float64(n) / float64(of)
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
