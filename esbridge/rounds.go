package esbridge

import (
	"bytes"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/shared"
)

// Fetch rounds run on a bounded pool of workers fed by a FIFO of keys. A
// key is in the FIFO at most once and runs on at most one worker at a time,
// so however many notifications, subscribes or resyncs arrive, the bridge
// holds at most MaxConcurrentFetches goroutines for them and at most one
// queue entry per subscribed key. Workers start when keys wait and none is
// free. A worker whose FIFO is empty waits workerLinger for more before it
// ends: a key changing every few milliseconds then reuses one worker (a
// goroutine started per round costs its start and, each time, the growth
// of its stack), and a bridge idle for longer holds no goroutine.

// workerLinger is how long a worker without work waits for more before it
// ends: longer than the gap between changes of a key updated at 100/s.
const workerLinger = 20 * time.Millisecond

// request asks for a round of ks: right away if it is idle, or after the
// running one. all means every group must be fetched again (a notification);
// otherwise only new groups are. It reports whether it woke or started a
// worker for the key. With ks.mu held.
func (b *Bridge) request(ks *keyState, all bool) (woke bool) {
	if all {
		ks.dirty = true
	}
	if all && ks.notified.IsZero() && b.opts.OnRound != nil {
		ks.notified = time.Now()
	}
	if ks.running || ks.queued || !ks.needsRound() {
		return false // the running round re-queues the key when it ends
	}
	ks.queued = true
	w := &b.work
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		ks.queued = false
		return false
	}
	w.keys = append(w.keys, ks)
	if w.idle > 0 {
		w.idle--
		w.wake <- struct{}{} // never blocks: it holds a slot per lingering worker
		woke = true
	} else if w.workers < b.opts.MaxConcurrentFetches && w.workers < w.waiting()+w.busy {
		if w.wake == nil {
			w.wake = make(chan struct{}, b.opts.MaxConcurrentFetches)
		}
		w.workers++
		b.rounds.Add(1)
		go b.worker()
		woke = true
	}
	w.mu.Unlock()
	return woke
}

// waiting returns how many keys are in the FIFO. With w.mu held.
func (w *workQueue) waiting() int { return len(w.keys) - w.head }

// pop takes the FIFO's first key. The FIFO's array is kept and reused: an
// empty FIFO starts again at its beginning, and a long one is moved back
// once half of it has been taken. With w.mu held.
func (w *workQueue) pop() *keyState {
	ks := w.keys[w.head]
	w.keys[w.head] = nil
	w.head++
	if w.head == len(w.keys) {
		w.keys, w.head = w.keys[:0], 0
	} else if w.head >= 64 && 2*w.head >= len(w.keys) {
		n := copy(w.keys, w.keys[w.head:])
		clear(w.keys[n:])
		w.keys, w.head = w.keys[:n], 0
	}
	return ks
}

// worker runs rounds while keys wait, lingers for more when none does, and
// ends after between workerLinger and twice that without a round, or when
// the bridge closes. Its timer is re-armed once per workerLinger, not per
// round: a key changing every few milliseconds costs no timer operation.
func (b *Bridge) worker() {
	defer b.rounds.Done()
	w := &b.work
	var linger *time.Timer
	worked := false // a round ran since linger was armed
	w.mu.Lock()
	for !w.closed {
		if w.waiting() > 0 {
			ks := w.pop()
			w.busy++
			w.mu.Unlock()
			b.round(ks)
			w.mu.Lock()
			w.busy--
			worked = true
			continue
		}
		// Linger. w.idle counts the lingering workers that no request has
		// woken yet: a request takes one off it and puts a token in
		// w.wake, which any lingering worker may take.
		w.idle++
		w.mu.Unlock()
		if linger == nil {
			linger, worked = time.NewTimer(workerLinger), false
		}
		select {
		case <-w.wake:
			w.mu.Lock()
			continue
		case <-linger.C:
		}
		w.mu.Lock()
		select {
		case <-w.wake:
			// A request counted on a lingering worker: be it.
			linger.Reset(workerLinger)
			worked = false
			continue
		default:
		}
		w.idle--
		if worked {
			linger.Reset(workerLinger)
			worked = false
			continue
		}
		break
	}
	w.workers--
	w.mu.Unlock()
	if linger != nil {
		linger.Stop()
	}
}

// fetchJob is one group's fetch in a round.
type fetchJob struct {
	group string
	rows  [][]byte
	err   error
}

// publication is a state to hand to a group's members.
type publication struct {
	u       *Update
	members []*subscription
	// prev is the collection state u replaced, when members may hold it and
	// take a diff: the diff from it is made before the fan-out, once.
	prev *Update
}

// round fetches the groups of ks that need it, publishes the results that
// differ from each group's current state under a new sequence number, and
// fans them out. Notifications that arrive meanwhile make another round.
func (b *Bridge) round(ks *keyState) {
	ks.mu.Lock()
	ks.queued = false
	if !ks.needsRound() || b.ctx.Err() != nil {
		ks.mu.Unlock()
		b.maybeRemove(ks)
		return
	}
	ks.running = true
	all := ks.dirty
	ks.dirty = false
	r := Round{Key: ks.key, Notified: ks.notified}
	ks.notified = time.Time{}
	if b.opts.OnRound != nil {
		r.Started = time.Now()
	}
	// A key has one group unless its rows depend on the secret: its round
	// needs no slice on the heap.
	var jobsBuf [1]fetchJob
	var pubsBuf [1]publication
	jobs := jobsBuf[:0]
	if len(ks.groups) > len(jobsBuf) {
		jobs = make([]fetchJob, 0, len(ks.groups))
	}
	for name, g := range ks.groups {
		if all || g.stale {
			g.stale = false
			jobs = append(jobs, fetchJob{group: name})
		}
	}
	ks.mu.Unlock()

	for i := range jobs {
		jobs[i].rows, jobs[i].err = b.fetch(ks.key, jobs[i].group)
		if jobs[i].err == nil {
			jobs[i].rows = b.validUTF8(ks.key, jobs[i].rows, &ks.badUTF8, "fetch")
		}
	}
	r.Fetches = len(jobs)
	if b.opts.OnRound != nil {
		r.Fetched = time.Now()
	}

	ks.mu.Lock()
	failed := false
	pubs := pubsBuf[:0]
	if len(jobs) > len(pubsBuf) {
		pubs = make([]publication, 0, len(jobs))
	}
	for _, j := range jobs {
		if j.err != nil {
			failed = true
			r.FetchErrors++
			b.stats.fetchErrors.Add(1)
			b.log.WithError(j.err).WithField("key", ks.key.String()).Error("fetch failed; clients keep their last state until a retry succeeds")
			continue
		}
		g := ks.groups[j.group]
		if g == nil {
			continue // its last member left during the fetch
		}
		var prev *Update
		if g.current == nil || !sameRows(g.current.Rows, j.rows) {
			prev = ks.publish(g, newState(ks.key, j.rows, b.seq.Add(1), j.group, ks.coll), b.opts.KeptStates)
		}
		p := publication{u: g.current, members: g.snapshot()}
		if prev != nil && ks.coll != nil && ks.coll.differs > 0 {
			p.prev = prev
		}
		pubs = append(pubs, p)
	}
	ks.mu.Unlock()

	// Outside the key's lock: subscribes, unsubscribes and notifications of
	// this key go on meanwhile. Each client keeps the last Seq it got per
	// key, so a member that already has this state (or a newer one, from a
	// later subscribe) is skipped.
	for _, p := range pubs {
		if p.prev != nil {
			p.u.viewFrom(p.prev) // the diff most members need, made once
		}
	}
	fanStart := time.Now()
	for _, p := range pubs {
		r.Deliveries += b.fanOut(p)
	}
	fanOut := time.Since(fanStart)
	if b.opts.OnRound != nil {
		r.Delivered = time.Now()
		b.opts.OnRound(r)
	}

	ks.mu.Lock()
	if failed {
		b.scheduleRetry(ks)
	} else {
		ks.retry = 0
	}
	ks.noteRound(fanStart.Add(fanOut))
	if pause := ks.pause(fanOut); pause > 0 {
		// Changes come faster than the key's fan-outs end: the key stays
		// busy for half as long again before its next round, so one key's
		// fan-outs take at most two thirds of a worker's time, and a round
		// covers the changes meanwhile (latest-wins, as for a slow client)
		// instead of spending the machine on states about to be replaced.
		ks.mu.Unlock()
		time.AfterFunc(pause, func() { b.endRound(ks) })
		return
	}
	ks.mu.Unlock()
	b.endRound(ks)
}

// minPacedFanOut is the shortest fan-out after which a key's next round
// may wait (see keyState.pause): below it, changes are never coalesced for
// time. 2 ms is about 1,000 subscribers on this project's 2-core machine.
const minPacedFanOut = 2 * time.Millisecond

// pause returns how long the key waits before its next round after a
// fan-out that took fanOut: half of it when the key was notified meanwhile
// and its changes come faster than its fan-outs take (the key's fan-outs
// would otherwise run back to back), else nothing. A change that happens
// to arrive during a fan-out of a key whose changes are further apart than
// its fan-outs waits for nothing: the workers keep up. With ks.mu held.
func (ks *keyState) pause(fanOut time.Duration) time.Duration {
	if !ks.dirty || fanOut < minPacedFanOut || ks.gap == 0 || ks.gap >= fanOut {
		return 0
	}
	return fanOut / 2
}

// noteRound ends a sample of the key's change rate at end, the end of a
// round, from the notifications counted since the last one (a
// notification only counts, as reading the clock for each would cost more
// than the rest of its handling): the average gap between them, over the
// last eight samples roughly. With ks.mu held.
func (ks *keyState) noteRound(end time.Time) {
	if ks.changes == 0 {
		return // the sample goes on until a notification came
	}
	if !ks.sampled.IsZero() {
		gap := max(end.Sub(ks.sampled)/time.Duration(ks.changes), 1)
		if ks.gap == 0 {
			ks.gap = gap
		} else {
			ks.gap += (gap - ks.gap) / 8
		}
	}
	ks.sampled, ks.changes = end, 0
}

// endRound releases the key after a round, starting the next one if it was
// notified meanwhile or a group joined.
func (b *Bridge) endRound(ks *keyState) {
	ks.mu.Lock()
	ks.running = false
	b.request(ks, false)
	empty := ks.nsubs == 0
	ks.mu.Unlock()
	if empty {
		b.maybeRemove(ks)
	}
}

// fetch calls the fetch function for one group of a key.
func (b *Bridge) fetch(key shared.EntityKey, secret string) ([][]byte, error) {
	ctx := newFetchContext(b.ctx, b.opts.FetchTimeout)
	defer ctx.release()
	b.stats.fetches.Add(1)
	return b.fetcher.Fetch(ctx, key, secret)
}

// fanOutShare is the fewest members worth a goroutine of their own in a
// fan-out. A member's frame is mostly a socket write of 5-10 µs (TCP on
// loopback, where the kernel also does the receiving side's work), so 50
// members take a quarter to half a millisecond, well worth waking another
// core for; with fewer, the wake-up (a futex, a thread that spins looking
// for work) would be a noticeable share of a change's CPU.
const fanOutShare = 50

// fanOut hands p's state to every member that does not have it yet. A large
// group is split between as many goroutines as there are cores: with direct
// writes, a fan-out is mostly write system calls, and the last member of a
// 1,000-member group would otherwise wait for 999 of them.
// It returns how many members were handed the state.
func (b *Bridge) fanOut(p publication) int {
	parts := min(runtime.GOMAXPROCS(0), len(p.members)/fanOutShare)
	if parts <= 1 {
		return b.deliverAll(p.u, p.members)
	}
	var (
		wg sync.WaitGroup
		n  atomic.Int64
	)
	size := (len(p.members) + parts - 1) / parts
	for i := size; i < len(p.members); i += size {
		wg.Add(1)
		go func(members []*subscription) {
			defer wg.Done()
			n.Add(int64(b.deliverAll(p.u, members)))
		}(p.members[i:min(i+size, len(p.members))])
	}
	n.Add(int64(b.deliverAll(p.u, p.members[:size])))
	wg.Wait()
	return int(n.Load())
}

// deliverAll hands u to each of members that does not have it yet, and
// returns how many it was handed to.
func (b *Bridge) deliverAll(u0 *Update, members []*subscription) int {
	n := 0
	for _, s := range members {
		u := u0
		if b.opts.Filter != nil {
			if u = b.filter(s.c, u); u == nil {
				continue
			}
		}
		if s.c.deliverTo(s, u) {
			n++
		}
	}
	b.stats.deliveries.Add(uint64(n))
	return n
}

// filter applies Options.Filter for one client. It returns u itself when the
// filter kept every row as it was, and nil (send nothing) when the filter
// panicked. The filter gets its own copy of the slice of rows (from a pool:
// no allocation per call once warm), so editing it in place, as
// slices.DeleteFunc or rows[:0] and append do, changes what this client gets
// and never the key's state that every other client gets.
func (b *Bridge) filter(c *Client, u *Update) (out *Update) {
	buf := filterRowsPool.Get().(*[][]byte)
	own := append((*buf)[:0], u.Rows...)
	var rows [][]byte
	defer func() {
		if r := recover(); r != nil {
			b.log.WithField("key", u.Key.String()).Errorf("row filter panicked; client gets nothing for this change: %v", r)
			out = nil
		}
		if cap(own) <= maxPooledFilterRows {
			// No row stays reachable from the pool, including rows a
			// filter appended within own's capacity.
			used := len(u.Rows)
			if len(rows) > used && len(rows) <= cap(own) {
				used = len(rows)
			}
			clear(own[:used])
			*buf = own[:0]
			filterRowsPool.Put(buf)
		}
	}()
	rows = b.opts.Filter(c.ctx, u.Key, own)
	if sameRowSlices(rows, u.Rows) {
		return u
	}
	// rows may live in own's array, which goes back to the pool.
	rows = b.validUTF8(u.Key, slices.Clone(rows), &b.filterBadUTF8, "filter")
	return newState(u.Key, rows, u.Seq, u.group, u.coll)
}

// validUTF8 returns rows with each run of invalid UTF-8 bytes in a row
// replaced by U+FFFD. Rows go to clients in websocket text frames, which
// must hold valid UTF-8: a browser (RFC 6455, section 8.1) fails a
// connection that receives anything else, and its client would reconnect
// into the same row over and over while every other key on the page goes
// stale. Such rows are common enough (a Go string cut at a byte count,
// Latin-1 data, SQLite TEXT) and are still valid JSON to json.Valid. Only
// a row that needs it is copied; rows itself is copied before it is changed,
// since the fetcher or filter may keep it. The first repair is logged, once
// per logged flag (a key's, or the bridge's for its filter); from is
// where the rows came from.
func (b *Bridge) validUTF8(key shared.EntityKey, rows [][]byte, logged *atomic.Bool, from string) [][]byte {
	bad, first := 0, -1
	for i, r := range rows {
		if utf8.Valid(r) {
			continue
		}
		if bad == 0 {
			rows = slices.Clone(rows)
			first = i
		}
		bad++
		rows[i] = bytes.ToValidUTF8(r, []byte("\uFFFD"))
	}
	if bad > 0 && logged.CompareAndSwap(false, true) {
		b.log.WithFields(logrus.Fields{"key": key.String(), "rows": bad, "first": first}).
			Warnf("%s returned rows with invalid UTF-8; each run of invalid bytes is sent as U+FFFD (logged once)", from)
	}
	return rows
}

// filterRowsPool holds the slices of rows handed to Options.Filter
// (*[][]byte). maxPooledFilterRows is the largest one kept: a key with
// more rows than that costs its filter one allocation per client.
var filterRowsPool = sync.Pool{New: func() any { return new([][]byte) }}

const maxPooledFilterRows = 1 << 16

// sameRowSlices reports whether a and b hold the very same rows (the same
// bytes in memory, in the same order), without comparing their contents.
func sameRowSlices(a, b [][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if len(a[i]) != len(b[i]) || (len(a[i]) > 0 && &a[i][0] != &b[i][0]) {
			return false
		}
	}
	return true
}

// scheduleRetry re-requests a failed key after a growing delay. With ks.mu
// held.
func (b *Bridge) scheduleRetry(ks *keyState) {
	if ks.timer != nil || ks.dirty {
		return // a retry is already due, or a follow-up round runs anyway
	}
	if ks.retry == 0 {
		ks.retry = b.opts.RetryDelay
	} else if ks.retry *= 2; ks.retry > b.opts.MaxRetryDelay {
		ks.retry = b.opts.MaxRetryDelay
	}
	ks.timer = time.AfterFunc(ks.retry, func() {
		ks.mu.Lock()
		ks.timer = nil
		b.request(ks, true)
		ks.mu.Unlock()
	})
}

// maybeRemove drops ks from the index once nobody subscribes and no round
// runs or waits.
func (b *Bridge) maybeRemove(ks *keyState) {
	unwatch := false
	defer func() { // after the locks are released
		if unwatch {
			b.interest.Unwatch(ks.key)
		}
	}()
	sh := b.shard(ks.key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	ks.mu.Lock()
	defer ks.mu.Unlock()
	if ks.nsubs > 0 || ks.running || ks.queued || ks.removed {
		return
	}
	ks.removed = true
	unwatch = ks.watched
	if ks.timer != nil {
		ks.timer.Stop()
		ks.timer = nil
	}
	if sh.keys[ks.key] == ks {
		delete(sh.keys, ks.key)
	}
}
