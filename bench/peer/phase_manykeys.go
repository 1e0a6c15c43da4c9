//go:build linux

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"
)

// The many-keys phase: many keys with a few subscribers each, as a todo
// list, a document or a user's profile has, where the fixed cost of a
// change (notify, queue, fetch, encode, wake-ups) matters more than the
// fan-out. One set of connections per system and server count; each
// distribution of the changes over the keys is one measured window on it.

// manyConfig is the phase's shape (-mk-* flags).
type manyConfig struct {
	keys, conns      int
	subs             string // min:max subscribers per key
	minSubs, maxSubs int
	rate             float64
	changes          int
	dists            string
	zipfS            float64
	workers          int
}

func (m *manyConfig) flags() {
	flag.IntVar(&m.keys, "mk-keys", 10000, "many-keys phase: keys (entities)")
	flag.IntVar(&m.conns, "mk-conns", 1000, "many-keys phase: websocket connections the subscriptions are spread over")
	flag.StringVar(&m.subs, "mk-subs", "1:5", "many-keys phase: subscribers per key, min:max (uniform)")
	flag.Float64Var(&m.rate, "mk-rate", 2000, "many-keys phase: changes per second over all keys")
	flag.IntVar(&m.changes, "mk-changes", 8000, "many-keys phase: changes per distribution")
	flag.StringVar(&m.dists, "mk-dists", "zipf,uniform", "many-keys phase: how changes pick their key, comma-separated: zipf, uniform")
	flag.Float64Var(&m.zipfS, "mk-zipf-s", 1.1, "many-keys phase: the Zipf distribution's exponent (> 1)")
	flag.IntVar(&m.workers, "mk-workers", 8, "many-keys phase: concurrent writers making the changes (one key's changes stay with one)")
}

// check validates the flags and fills minSubs and maxSubs.
func (m *manyConfig) check() error {
	lo, hi, ok := strings.Cut(m.subs, ":")
	a, err1 := strconv.Atoi(lo)
	b, err2 := strconv.Atoi(hi)
	if !ok || err1 != nil || err2 != nil || a <= 0 || b < a || b > m.conns {
		return fmt.Errorf("-mk-subs %q: want min:max with 0 < min <= max <= -mk-conns", m.subs)
	}
	m.minSubs, m.maxSubs = a, b
	if m.keys <= 0 || m.keys > maxKeys || m.conns <= 0 || m.conns > maxClients || m.rate <= 0 || m.changes <= 0 || m.changes > 200000 || m.workers <= 0 || m.zipfS <= 1 {
		return errors.New("many-keys flags: want 0 < keys <= 100000, 0 < conns <= 20000, rate > 0, 0 < changes <= 200000, workers > 0, zipf-s > 1")
	}
	for d := range strings.SplitSeq(m.dists, ",") {
		if d != "zipf" && d != "uniform" {
			return fmt.Errorf("-mk-dists: unknown distribution %q", d)
		}
	}
	return nil
}

// changeSequence is the keys n changes write, drawn from keys 1..keys:
// uniformly, or Zipf-distributed (rank r has weight 1/(r+1)^s) with the
// ranks shuffled over the keys so the hot keys are not the lowest ids. The
// same seed gives the same sequence, so every system gets the same one.
func changeSequence(dist string, keys, n int, s float64, seed uint64) []int {
	rng := rand.New(rand.NewPCG(seed, 0xc4a9))
	ids := make([]int, n)
	switch dist {
	case "zipf":
		perm := rng.Perm(keys)
		z := rand.NewZipf(rng, s, 1, uint64(keys-1))
		for i := range ids {
			ids[i] = perm[z.Uint64()] + 1
		}
	default:
		for i := range ids {
			ids[i] = 1 + rng.IntN(keys)
		}
	}
	return ids
}

// manyResult is one system's measurement of one distribution.
type manyResult struct {
	servers int
	sys     system
	dist    string
	subs    int // subscriptions over all connections
	measurement
	// endpointNs is the CPU per change of the write endpoint alone (no
	// notify) in the server taking the changes, measured on the same
	// deployment: the part of "server CPU / change" every system pays
	// alike (0: not measured).
	endpointNs int64
}

// runManyKeys opens the phase's connections on sys's holder and measures
// each distribution on them.
func (o *orchestrator) runManyKeys(ctx context.Context, sys system, servers int) {
	mc := o.cfg.many
	dists := strings.Split(mc.dists, ",")
	fail := func(err error) {
		for _, dist := range dists {
			r := manyResult{servers: servers, sys: sys, dist: dist}
			r.err = err.Error()
			o.many = append(o.many, r)
		}
		progress("many keys, %s, %d server(s): %v", sys.name, servers, err)
	}
	d, err := o.deploy(sys, servers)
	if err != nil {
		fail(fmt.Errorf("setup: %w", err))
		return
	}
	defer d.stop()
	progress("many keys, %s, %d server(s): opening %s connections on %s keys", sys.name, servers, commas(int64(mc.conns)), commas(int64(mc.keys)))
	open, closeAll, err := o.openClients(ctx, d, openSpec{conns: mc.conns, keys: mc.keys, minSubs: mc.minSubs, maxSubs: mc.maxSubs})
	if err != nil {
		fail(fmt.Errorf("open: %w", err))
		return
	}
	defer closeAll()
	endpoint := o.endpointCost(ctx, d)
	for i, dist := range dists {
		progress("many keys, %s, %d server(s), %s: %g/s × %s", sys.name, servers, dist, mc.rate, commas(int64(mc.changes)))
		r := manyResult{servers: servers, sys: sys, dist: dist, subs: open.Subs, endpointNs: endpoint}
		ids := changeSequence(dist, mc.keys, mc.changes, mc.zipfS, uint64(i+1))
		r.measurement = o.measure(ctx, d, window{ids: ids, rate: mc.rate, workers: mc.workers,
			profile: fmt.Sprintf("manykeys-%s-%ds-%s", sys.role, servers, dist)})
		if r.err != "" {
			progress("  %s", r.err)
		}
		o.many = append(o.many, r)
	}
}

// endpointCost measures the CPU per change of d's write endpoint alone:
// half a second of the phase's rate of requests with noop=1 (the version written,
// nothing notified) to keys no client holds, in the server taking the
// changes. 0 when it could not be measured (a note says why).
func (o *orchestrator) endpointCost(ctx context.Context, d *deployment) int64 {
	mc := o.cfg.many
	ids := make([]int, max(1, int(mc.rate/2)))
	for i := range ids {
		ids[i] = mc.keys + 1 + i%mc.workers // one unsubscribed key per writer
	}
	var before, after serverStats
	if err := call(ctx, 10*time.Second, d.publisher.hello.Ctl, "/stats", nil, nil, &before); err != nil {
		o.note("write endpoint alone, %s: %v", d.sys.name, err)
		return 0
	}
	res := driveQuery(ctx, d.publisher.hello.App, "noop=1&", ids, mc.rate, mc.workers)
	if err := call(ctx, 10*time.Second, d.publisher.hello.Ctl, "/stats", nil, nil, &after); err != nil || res.Errors > 0 || len(res.Changes) == 0 {
		o.note("write endpoint alone, %s: %v %s", d.sys.name, err, res.FirstErr)
		return 0
	}
	return (after.CPUNanos - before.CPUNanos) / int64(len(res.Changes))
}
