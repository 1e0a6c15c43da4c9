package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/google/pprof/profile"
)

// profiled is a CPU profile written for one process over one window.
type profiled struct {
	name    string // window and process: "manykeys-seed-2s-zipf-holder"
	path    string
	changes int // changes made in the window
}

// printProfiles writes, for each profile -profile wrote, the CPU per change
// of each category of work: where a change's microseconds go.
func (o *orchestrator) printProfiles(b *strings.Builder) {
	if len(o.profiles) == 0 {
		return
	}
	b.WriteString("\n### Where a change's CPU goes (from the CPU profiles, µs per change)\n\n| category |")
	var cols [][]cpuShare
	var totals []float64
	for _, p := range o.profiles {
		shares, total, err := profileBreakdown(p.path, p.changes)
		if err != nil {
			o.note("profile breakdown: %v", err)
			continue
		}
		fmt.Fprintf(b, " %s |", p.name)
		cols, totals = append(cols, shares), append(totals, total)
	}
	b.WriteString("\n| --- |" + strings.Repeat(" --- |", len(cols)) + "\n")
	if len(cols) == 0 {
		return
	}
	for i := range cols[0] {
		fmt.Fprintf(b, "| %s |", cols[0][i].name)
		for _, c := range cols {
			fmt.Fprintf(b, " %.1f |", c[i].us)
		}
		b.WriteString("\n")
	}
	b.WriteString("| sampled in all |")
	for _, t := range totals {
		fmt.Fprintf(b, " %.1f |", t)
	}
	b.WriteString("\n\n- profiles: one per server process and window (holder: the clients' server; publisher: the server taking the changes, two-server rows), " +
		"in " + o.cfg.profile + "; a sample goes to the first category in this order with a function on its stack " +
		"(bench/peer/cpuprofile.go lists them); CPU sampled at 100 Hz, so a short window's figures are rough and the " +
		"sampled total is below the measured one. Profiling itself costs CPU: read the tables above from a run without -profile.\n")
}

// cpuCategory is one part of a server's work, recognised in a CPU profile
// sample by a function on its stack.
type cpuCategory struct {
	name  string
	funcs []string // prefixes of function names (package path included)
}

// cpuCategories are checked in order: a sample goes to the first category
// one of whose functions is on its stack, so the specific ones (a socket
// write inside a round, a notification inside an HTTP handler) come before
// the ones that hold them.
var cpuCategories = []cpuCategory{
	{"GC and heap", []string{"runtime.gcBgMarkWorker", "runtime.gcAssistAlloc", "runtime.bgsweep", "runtime.bgscavenge", "runtime.mallocgc"}},
	{"socket writes to clients", []string{
		"github.com/entity-sync/entity-sync/esweb.(*conn).send",
		"github.com/entity-sync/entity-sync/esweb.(*conn).flush",
		"github.com/centrifugal/centrifuge.(*writer)",
		"github.com/centrifugal/centrifuge.(*websocketTransport)",
		"github.com/centrifugal/centrifuge/internal/websocket."}},
	{"encoding frames", []string{
		"github.com/entity-sync/entity-sync/esweb.(*conn).frames",
		"github.com/entity-sync/entity-sync/esbridge.(*Update).Memo",
		"github.com/centrifugal/protocol."}},
	{"fetch (the app's fetch function through the bridge)", []string{
		"github.com/entity-sync/entity-sync/esbridge.(*Bridge).fetch"}},
	// Centrifuge's broadcast runs inside Publish (memory broker) or its
	// handling of a Redis message, so it comes before those two.
	{"fan-out and rounds (choosing who gets what, handing it over)", []string{
		"github.com/entity-sync/entity-sync/esbridge.(*Bridge).worker",
		"github.com/entity-sync/entity-sync/esbridge.(*Bridge).fanOut",
		"github.com/centrifugal/centrifuge.(*Hub)",
		"github.com/centrifugal/centrifuge.(*subShard)"}},
	{"notify call in the write handler (encode, publish, wait for the queue)", []string{
		"github.com/entity-sync/entity-sync/esbridge.(*Bridge).NotifyAllOfChange",
		"github.com/entity-sync/entity-sync/esbridge.(*Bridge).NotifyKeys",
		"github.com/centrifugal/centrifuge.(*Node).Publish"}},
	{"receiving a notification (decode, loss check, hand to the key)", []string{
		"github.com/entity-sync/entity-sync/esbridge.(*Bridge).receive",
		"github.com/entity-sync/entity-sync/esq.(*nsqSubscription).handle",
		"github.com/entity-sync/entity-sync/esq.(*seqSub).handle",
		"github.com/centrifugal/centrifuge.(*Node).handlePublication",
		"github.com/centrifugal/centrifuge.(*Node).HandlePublication"}},
	{"queue client (NSQ or Redis connections and hand-offs)", []string{
		"github.com/entity-sync/entity-sync/esq.(*nsqConsumer)",
		"github.com/entity-sync/entity-sync/esq.(*consumerConn)",
		"github.com/entity-sync/entity-sync/esq.readFrame",
		"github.com/entity-sync/entity-sync/esq.(*producer).read",
		"github.com/redis/rueidis."}},
	{"websocket reads (requests, pings)", []string{
		"github.com/entity-sync/entity-sync/esweb.(*conn).readPump"}},
	{"write endpoint (HTTP request, version write)", []string{"net/http.(*conn).serve"}},
	{"Go scheduler, netpoll, timers (waking goroutines)", []string{
		"runtime.schedule", "runtime.findRunnable", "runtime.mcall", "runtime.park_m",
		"runtime.netpoll", "runtime.mstart", "runtime.goexit0", "runtime.sysmon"}},
}

// cpuShare is the CPU time per change one category took in a profile.
type cpuShare struct {
	name string
	us   float64
}

// profileBreakdown reads the CPU profile at path and returns each
// category's CPU per change (the sampled time divided by changes), in
// cpuCategories' order with "other" last, and the sampled total per change.
func profileBreakdown(path string, changes int) ([]cpuShare, float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	p, err := profile.Parse(f)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", path, err)
	}
	ns := -1 // the sample value holding CPU nanoseconds
	for i, st := range p.SampleType {
		if st.Type == "cpu" && st.Unit == "nanoseconds" {
			ns = i
		}
	}
	if ns < 0 || changes == 0 {
		return nil, 0, fmt.Errorf("%s: no CPU samples", path)
	}
	sums := make([]int64, len(cpuCategories)+1)
	var total int64
	for _, s := range p.Sample {
		v := s.Value[ns]
		total += v
		sums[categoryOf(s)] += v
	}
	shares := make([]cpuShare, len(sums))
	for i := range sums {
		name := "other"
		if i < len(cpuCategories) {
			name = cpuCategories[i].name
		}
		shares[i] = cpuShare{name, float64(sums[i]) / 1e3 / float64(changes)}
	}
	return shares, float64(total) / 1e3 / float64(changes), nil
}

// categoryOf returns the index of the first category with a function on
// s's stack, or len(cpuCategories) for none.
func categoryOf(s *profile.Sample) int {
	for i, c := range cpuCategories {
		for _, loc := range s.Location {
			for _, line := range loc.Line {
				if line.Function == nil {
					continue
				}
				for _, prefix := range c.funcs {
					if strings.HasPrefix(line.Function.Name, prefix) {
						return i
					}
				}
			}
		}
	}
	return len(cpuCategories)
}
