//go:build linux

package main

import (
	"context"
	"fmt"
	"net/url"
	"path/filepath"
	"time"
)

// What the peer, breakdown and many-keys phases share: a system's server
// processes, the clients opened on the first, and one measured window of
// changes made through the last.

// deployment is one system's server processes: holder holds the clients;
// publisher makes the changes (the same process with one server).
type deployment struct {
	sys       system
	servers   int
	holder    *child
	publisher *child
}

// deploy starts sys's server process(es). With two, the changes cross the
// broker between them: nsqd (entity-sync), Redis (Centrifuge, and
// entity-sync's api-redis).
func (o *orchestrator) deploy(sys system, servers int, extra ...string) (*deployment, error) {
	args := []string{"-cell", o.cell}
	if servers == 2 {
		switch sys.role {
		case "seed", "api":
			args = append(args, "-nsqd", o.nsqd)
		case "cf", "api-redis":
			args = append(args, "-redis-addr", o.cfg.redis, "-prefix", o.prefix)
		}
	}
	if o.cfg.verbose {
		args = append(args, "-v")
	}
	d := &deployment{sys: sys, servers: servers}
	var err error
	if d.holder, err = spawn(sys.role, 30*time.Second, append(args, extra...)...); err != nil {
		return nil, err
	}
	d.publisher = d.holder
	if servers == 2 {
		if d.publisher, err = spawn(sys.role, 30*time.Second, args...); err != nil {
			d.holder.Stop()
			return nil, err
		}
	}
	return d, nil
}

func (d *deployment) stop() {
	if d.publisher != d.holder {
		d.publisher.Stop()
	}
	d.holder.Stop()
}

// procs are the deployment's distinct server processes.
func (d *deployment) procs() []*child {
	if d.publisher == d.holder {
		return []*child{d.holder}
	}
	return []*child{d.holder, d.publisher}
}

// openSpec is how the clients subscribe (subscriptionPlan).
type openSpec struct {
	conns, keys, minSubs, maxSubs int
}

// openClients opens the clients on d's holder; the returned function
// closes them.
func (o *orchestrator) openClients(ctx context.Context, d *deployment, spec openSpec) (openResult, func(), error) {
	cl := o.clients.hello.Ctl
	var open openResult
	err := call(ctx, 120*time.Second, cl, "/open", url.Values{
		"proto": {d.sys.role}, "url": {d.holder.hello.WS}, "n": {fmt.Sprint(spec.conns)},
		"keys": {fmt.Sprint(spec.keys)}, "min": {fmt.Sprint(spec.minSubs)}, "max": {fmt.Sprint(spec.maxSubs)},
	}, nil, &open)
	closeAll := func() {
		if err := call(context.Background(), 30*time.Second, cl, "/close", nil, nil, nil); err != nil {
			o.note("closing %s clients: %v", d.sys.name, err)
		}
	}
	if err == nil && open.Errors > 0 {
		err = fmt.Errorf("%d of %d connections failed: %s", open.Errors, spec.conns, open.FirstErr)
	}
	if err != nil {
		closeAll()
		return open, nil, err
	}
	return open, closeAll, nil
}

// measurement is one window of changes as the clients and servers saw it.
type measurement struct {
	err     string // why there is no (or a partial) measurement
	cpuNs   int64  // CPU of every server process of the system
	mallocs int64  // heap objects allocated by every server process
	fetches int64  // fetch function calls (entity-sync) in every server process
	clients rowResult
	drive   driveResult
}

// window says what one measurement does.
type window struct {
	ids     []int   // the entity each change writes, in order
	rate    float64 // changes per second
	workers int     // driver goroutines
	profile string  // with -profile, the CPU profile's file name stem
	raw     *breakdownRaw
}

// measure makes one window of changes through d's publisher with the
// clients open on d's holder: one warm-up change through the whole path
// (not measured); then record, make the changes at their rate, wait until
// every subscriber holds each entity's last version, and collect the
// clients' deliveries and visible latencies and the servers' CPU time,
// allocations and fetches over that window. With w.raw (the breakdown
// phase; the holder runs with -stamp), it also records the holder's rounds
// and socket writes over the window and collects them with every client's
// arrivals.
func (o *orchestrator) measure(ctx context.Context, d *deployment, w window) measurement {
	var m measurement
	cl := o.clients.hello.Ctl

	// The warm-up also proves the path: a subscription the broker has not
	// set up yet loses a change, so it is retried a few times before the
	// row fails.
	var wr waitResult
	var err error
	for try := 1; ; try++ {
		warm := drive(ctx, d.publisher.hello.App, w.ids[:1], 1, 1)
		if warm.Errors > 0 {
			err = fmt.Errorf("%s", warm.FirstErr)
		} else {
			err = call(ctx, 5*time.Second, cl, "/wait", nil, lastVersions(warm.Changes), &wr)
		}
		if err == nil && !wr.OK {
			err = fmt.Errorf("%d subscribers behind, %d dead", wr.Behind, wr.Dead)
		}
		if err == nil || try == 5 || ctx.Err() != nil {
			break
		}
	}
	if err != nil {
		m.err = "warm-up change: " + err.Error()
		return m
	}

	if err := call(ctx, 10*time.Second, cl, "/record", nil, nil, nil); err != nil {
		m.err = "record: " + err.Error()
		return m
	}
	before, err := o.stats(ctx, d)
	if err != nil {
		m.err = "stats: " + err.Error()
		return m
	}
	if w.raw != nil {
		if err := call(ctx, 10*time.Second, d.holder.hello.Ctl, "/stamps/record", nil, nil, nil); err != nil {
			m.err = "stamps: " + err.Error()
			return m
		}
	}
	profiling := o.cfg.profile != "" && w.profile != ""
	if profiling {
		for i, p := range d.procs() {
			path := filepath.Join(o.cfg.profile, fmt.Sprintf("%s-%s.pprof", w.profile, []string{"holder", "publisher"}[i]))
			if err := call(ctx, 10*time.Second, p.hello.Ctl, "/profile/start", url.Values{"path": {path}}, nil, nil); err != nil {
				o.note("profile %s: %v", path, err)
			}
		}
	}
	m.drive = drive(ctx, d.publisher.hello.App, w.ids, w.rate, w.workers)
	if m.drive.Errors > 0 && len(m.drive.Changes) == 0 {
		m.err = fmt.Sprintf("changes: %d errors: %s", m.drive.Errors, m.drive.FirstErr)
		return m
	}
	waitErr := call(ctx, 62*time.Second, cl, "/wait", nil, lastVersions(m.drive.Changes), &wr)
	if profiling {
		for i, p := range d.procs() {
			if err := call(ctx, 10*time.Second, p.hello.Ctl, "/profile/stop", nil, nil, nil); err != nil {
				continue
			}
			name := fmt.Sprintf("%s-%s", w.profile, []string{"holder", "publisher"}[i])
			o.profiles = append(o.profiles, profiled{name: name, path: filepath.Join(o.cfg.profile, name+".pprof"), changes: len(m.drive.Changes)})
		}
	}
	after, err := o.stats(ctx, d)
	if err != nil {
		m.err = "stats: " + err.Error()
		return m
	}
	m.cpuNs = after.CPUNanos - before.CPUNanos
	m.mallocs = int64(after.Mallocs - before.Mallocs)
	m.fetches = after.Fetches - before.Fetches
	if err := call(ctx, 60*time.Second, cl, "/result", nil, m.drive.Changes, &m.clients); err != nil {
		m.err = "result: " + err.Error()
		return m
	}
	if w.raw != nil {
		if err := call(ctx, 30*time.Second, d.holder.hello.Ctl, "/stamps/result", nil, nil, &w.raw.stamps); err != nil {
			m.err = "stamps: " + err.Error()
			return m
		}
		if err := call(ctx, 30*time.Second, cl, "/arrivals", nil, nil, &w.raw.arrivals); err != nil {
			m.err = "arrivals: " + err.Error()
			return m
		}
	}
	switch {
	case m.drive.Errors > 0:
		m.err = fmt.Sprintf("%d of %d changes failed: %s", m.drive.Errors, len(w.ids), m.drive.FirstErr)
	case waitErr != nil:
		m.err = "waiting for the last change: " + waitErr.Error()
	case !wr.OK:
		m.err = fmt.Sprintf("not converged after %.0f s: %d subscribers behind, %d connections dead", wr.Ms/1000, wr.Behind, wr.Dead)
	}
	return m
}

// stats sums /stats over d's server processes.
func (o *orchestrator) stats(ctx context.Context, d *deployment) (serverStats, error) {
	var sum serverStats
	for _, p := range d.procs() {
		var st serverStats
		if err := call(ctx, 10*time.Second, p.hello.Ctl, "/stats", nil, nil, &st); err != nil {
			return sum, err
		}
		sum.CPUNanos += st.CPUNanos
		sum.Mallocs += st.Mallocs
		sum.Fetches += st.Fetches
	}
	return sum, nil
}
