//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// defaultRows are the peer phase's rows: 20 clients at 100 changes/s
// (1,500 changes, 15 s), 200 clients at 200 changes/s (1,200 changes, 6 s)
// and 1,000 at 200 changes/s (400 changes, 2 s: still 400,000 samples),
// one key. A row's p99 rests on (subscriber, change) pairs: the short
// windows this phase had (10,000 pairs at 20 clients) let one scheduling
// hiccup of the shared 2-core machine move a ratio by half; these keep
// make bench near seven minutes with three systems.
const defaultRows = "20:100:1500,200:200:1200,1000:200:400"

// rowSpec is one row: how many clients, how fast and how many changes.
type rowSpec struct {
	clients int
	rate    float64
	changes int
}

func (r rowSpec) String() string {
	return fmt.Sprintf("%s clients, %g/s × %s", commas(int64(r.clients)), r.rate, commas(int64(r.changes)))
}

// parseRows reads -rows: clients:rate:changes, comma-separated.
func parseRows(s string) ([]rowSpec, error) {
	var rows []rowSpec
	for f := range strings.SplitSeq(s, ",") {
		p := strings.Split(strings.TrimSpace(f), ":")
		if len(p) != 3 {
			return nil, fmt.Errorf("row %q: want clients:rate:changes", f)
		}
		c, err1 := strconv.Atoi(p[0])
		r, err2 := strconv.ParseFloat(p[1], 64)
		n, err3 := strconv.Atoi(p[2])
		if err := errors.Join(err1, err2, err3); err != nil || c <= 0 || c > maxClients || r <= 0 || r > 10000 || n <= 0 || n > 100000 {
			return nil, fmt.Errorf("row %q: want 0 < clients <= 20000, 0 < rate <= 10000, 0 < changes <= 100000", f)
		}
		rows = append(rows, rowSpec{c, r, n})
	}
	return rows, nil
}

// system is one of the systems under test.
type system struct {
	role string // the child role, also the client protocol's name
	name string // as the tables print it
}

// allSystems are the systems under test: entity-sync used as the seed's
// README does (Setup, RegisterEntityAndDBHandler, raw dialect), entity-sync's
// current API (New, Register, envelope dialect), Centrifuge, and, with two
// servers only, entity-sync's current API over Centrifuge's broker (Redis),
// so that the broker's share of a difference shows.
var allSystems = []system{
	{"seed", "entity-sync seed API"},
	{"api", "entity-sync New+Register"},
	{"cf", "Centrifuge v0.40.1"},
	{"api-redis", "entity-sync New+Register over Redis"},
}

// twoServersOnly says whether a system exists only as two servers: the
// api system whose queue is Centrifuge's broker, Redis (redisq, routed by
// key), is the api system itself with one server.
func (s system) twoServersOnly() bool { return s.role == "api-redis" }

// needsRedis says whether the system's two-server half goes through Redis.
func (s system) needsRedis() bool { return s.role == "cf" || s.role == "api-redis" }

// isES says whether a system is entity-sync's.
func (s system) isES() bool { return s.role != "cf" }

// parseSystems reads -systems: role names, comma-separated.
func parseSystems(s string) ([]system, error) {
	var out []system
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		i := slices.IndexFunc(allSystems, func(s system) bool { return s.role == f })
		if i < 0 {
			return nil, fmt.Errorf("-systems: unknown system %q (want seed, api, cf)", f)
		}
		out = append(out, allSystems[i])
	}
	return out, nil
}

// allPhases are the phases in the order they run.
var allPhases = []string{"peer", "floor", "breakdown", "manykeys"}

// defaultPhases leave the floor out: on a saturated 2-core machine its
// 1,000-connection row alone takes about 15 s, and no target needs it
// (-phases peer,floor adds its table and the CPU per frame ÷ floor's
// column).
var defaultPhases = []string{"peer", "breakdown", "manykeys"}

// parsePhases reads -phases into a set.
func parsePhases(s string) (map[string]bool, error) {
	m := map[string]bool{}
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		if !slices.Contains(allPhases, f) {
			return nil, fmt.Errorf("-phases: unknown phase %q (want %s)", f, strings.Join(allPhases, ", "))
		}
		m[f] = true
	}
	return m, nil
}

// orchestrator runs the whole benchmark from the parent process: it owns
// the nsqd, the version cell and the child processes, and collects every
// row's result for the report.
type orchestrator struct {
	cfg     config
	systems []system
	clients *child
	cell    string
	nsqd    string
	prefix  string // Centrifuge's Redis prefix for this run
	results []result
	floor   []floorResult
	many    []manyResult
	notes   []string

	profiles []profiled // the CPU profiles written (-profile)

	breakdown       []breakdownResult
	breakdownFailed bool // -breakdown could not be read
}

// progress logs to stderr, so stdout holds only the report.
func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "peer: %s "+format+"\n", append([]any{time.Now().Format("15:04:05.000")}, args...)...)
}

// runOrchestrator sets up what every phase shares (version cell, nsqd,
// clients process), runs the phases asked for, and prints the report even
// when something failed; the exit code is 1 if any row failed.
func runOrchestrator(cfg config) int {
	start, host := time.Now(), readHost()
	rows, err := parseRows(cfg.rows)
	var systems []system
	var phases map[string]bool
	if err == nil {
		systems, err = parseSystems(cfg.systems)
	}
	if err == nil {
		if cfg.manyKeysOnly {
			cfg.phases = "manykeys"
		}
		phases, err = parsePhases(cfg.phases)
	}
	if err == nil {
		err = cfg.many.check()
	}
	if err == nil && cfg.profile != "" {
		err = os.MkdirAll(cfg.profile, 0o755)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "peer:", err)
		return 2
	}
	o := &orchestrator{cfg: cfg, systems: systems, prefix: fmt.Sprintf("entity-sync-bench-%d", os.Getpid())}
	defer func() { o.print(time.Since(start), host) }()
	ctx, cancel := context.WithTimeout(context.Background(), cfg.budget)
	defer cancel()

	dir, err := os.MkdirTemp("", "entity-sync-peer-")
	if err != nil {
		o.note("setup: %v", err)
		return 1
	}
	defer os.RemoveAll(dir)
	o.cell = filepath.Join(dir, "version")
	if err := createCell(o.cell); err != nil {
		o.note("setup: %v", err)
		return 1
	}
	broker, err := spawn("nsqd", 30*time.Second)
	if err != nil {
		o.note("setup: nsqd: %v", err)
		return 1
	}
	defer broker.Stop()
	o.nsqd = broker.hello.WS
	if o.clients, err = spawn("clients", 30*time.Second); err != nil {
		o.note("setup: %v", err)
		return 1
	}
	defer o.clients.Stop()

	// Traffic stays on this machine: a Redis elsewhere is refused, as
	// if none answered.
	redisErr := loopbackOnly(cfg.redis)
	if redisErr == nil {
		redisErr = pingRedis(cfg.redis)
	}
	// each runs fn for every system and server count, skipping the two-server
	// half when asked to and Centrifuge's when no Redis answers.
	each := func(fn func(sys system, servers int)) {
		for servers := 1; servers <= 2; servers++ {
			if servers == 2 && cfg.skipTwo {
				break
			}
			for _, sys := range o.systems {
				if servers == 1 && sys.twoServersOnly() || servers == 2 && sys.needsRedis() && redisErr != nil {
					continue
				}
				fn(sys, servers)
			}
		}
	}
	if cfg.skipTwo {
		o.note("two-server half skipped (-one-server-only)")
	} else if redisErr != nil && slices.ContainsFunc(o.systems, system.needsRedis) {
		o.note("no Redis answers at %s (%v): the two-server half of Centrifuge and of entity-sync over Redis skipped", cfg.redis, redisErr)
	}
	if phases["peer"] {
		each(func(sys system, servers int) { o.runSystem(ctx, sys, servers, rows) })
	}
	if phases["floor"] {
		o.runFloor(ctx, rows)
	}
	if phases["breakdown"] && cfg.breakdown != "" {
		o.runBreakdown(ctx, cfg.breakdown)
	}
	if phases["manykeys"] {
		each(func(sys system, servers int) { o.runManyKeys(ctx, sys, servers) })
	}

	code := 0
	if o.breakdownFailed {
		code = 1
	}
	for _, b := range o.breakdown {
		if b.err != "" {
			code = 1
		}
	}
	for _, r := range o.results {
		if r.err != "" {
			code = 1
		}
	}
	for _, f := range o.floor {
		if f.err != "" {
			code = 1
		}
	}
	for _, m := range o.many {
		if m.err != "" {
			code = 1
		}
	}
	return code
}

// note records something the report should say outside the tables.
func (o *orchestrator) note(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	progress("%s", s)
	o.notes = append(o.notes, s)
}
