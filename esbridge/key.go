package esbridge

import (
	"bytes"
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/entity-sync/entity-sync/shared"
)

// Update is one state of one key as a group of clients sees it: the rows a
// fetch returned (none: the entity is gone) and the round that produced them.
// The same *Update goes to every client of the group, so a transport encodes
// it once (see Memo).
type Update struct {
	Key  shared.EntityKey
	Rows [][]byte
	// Seq numbers the fetch rounds of this server (one counter for all keys,
	// so it keeps growing when a key is dropped from the index and
	// subscribed again); a client never receives a lower Seq after a higher
	// one for the same key.
	Seq uint64
	// Revoked means the client lost access to the key: no rows, and nothing
	// more will come for it.
	Revoked bool

	memoMu sync.Mutex                  // serialises building
	memo   atomic.Pointer[[]memoEntry] // copy-on-write: read without the lock
}

type memoEntry struct{ id, value any }

// Memo returns the value build made for id on this update, calling build only
// the first time: transports use it to encode a frame once for all
// subscribers. After the first call it takes no lock, so the writers of many
// connections do not queue up on a popular update.
func (u *Update) Memo(id any, build func(*Update) any) any {
	if v, ok := u.memoLookup(id); ok {
		return v
	}
	u.memoMu.Lock()
	defer u.memoMu.Unlock()
	if v, ok := u.memoLookup(id); ok {
		return v
	}
	v := build(u)
	var entries []memoEntry
	if old := u.memo.Load(); old != nil {
		entries = append(entries, *old...)
	}
	entries = append(entries, memoEntry{id, v})
	u.memo.Store(&entries)
	return v
}

func (u *Update) memoLookup(id any) (any, bool) {
	if p := u.memo.Load(); p != nil {
		for _, e := range *p {
			if e.id == id {
				return e.value, true
			}
		}
	}
	return nil, false
}

// size is the update's weight against a client's MaxPendingBytes.
func (u *Update) size() int {
	n := 64
	for _, r := range u.Rows {
		n += len(r)
	}
	return n
}

// keyState is everything the bridge knows about one key with local
// subscribers.
type keyState struct {
	key       shared.EntityKey
	perSecret bool

	mu      sync.Mutex
	groups  map[string]*group // by secret; the only group is "" unless perSecret
	nsubs   int
	running atomic.Bool // a round goroutine owns the key (written under mu)
	dirty   bool        // a notification arrived since the running round started
	// notified is set by receive without waiting for mu, which a round
	// holds through a fan-out that can take milliseconds at 10,000s of
	// subscribers; the round turns it into dirty before it ends.
	notified atomic.Bool
	removed  bool // dropped from the index; a new subscriber makes a new keyState
	retry    time.Duration
	timer    *time.Timer
}

// group is the clients of a key that see the same rows.
type group struct {
	clients map[*Client]uint64 // the Seq last handed to each client
	current *Update
}

func (ks *keyState) groupFor(secret string) *group {
	if !ks.perSecret {
		secret = ""
	}
	g := ks.groups[secret]
	if g == nil {
		g = &group{clients: make(map[*Client]uint64)}
		ks.groups[secret] = g
	}
	return g
}

// add subscribes c (anew: it will get the next round even if nothing
// changed, which is how a subscriber receives the initial state).
func (ks *keyState) add(c *Client, secret string) {
	g := ks.groupFor(secret)
	if _, ok := g.clients[c]; !ok {
		ks.nsubs++
	}
	g.clients[c] = 0
}

func (ks *keyState) remove(c *Client, secret string) {
	if !ks.perSecret {
		secret = ""
	}
	g := ks.groups[secret]
	if g == nil {
		return
	}
	if _, ok := g.clients[c]; ok {
		delete(g.clients, c)
		ks.nsubs--
	}
	if len(g.clients) == 0 {
		delete(ks.groups, secret)
	}
}

// request asks for a fetch round. With ks.mu held.
func (b *Bridge) request(ks *keyState) {
	if ks.running.Load() {
		ks.dirty = true
		return
	}
	if ks.removed || ks.nsubs == 0 {
		return
	}
	b.life.RLock()
	defer b.life.RUnlock()
	if b.closed {
		return
	}
	ks.running.Store(true)
	b.rounds.Add(1)
	go b.run(ks)
}

type fetched struct {
	secret string
	rows   [][]byte
	err    error
}

// run executes rounds for ks until no notification arrived during the last
// one.
func (b *Bridge) run(ks *keyState) {
	defer b.rounds.Done()
	for {
		select {
		case b.fetchSlots <- struct{}{}:
		case <-b.ctx.Done():
			ks.mu.Lock()
			ks.running.Store(false)
			ks.mu.Unlock()
			return
		}
		ks.mu.Lock()
		ks.dirty = false
		ks.notified.Store(false) // this round's fetch covers it
		seq := b.roundSeq.Add(1)
		results := make([]fetched, 0, len(ks.groups))
		for secret := range ks.groups {
			results = append(results, fetched{secret: secret})
		}
		ks.mu.Unlock()

		for i := range results {
			ctx, cancel := context.WithTimeout(b.ctx, b.opts.FetchTimeout)
			results[i].rows, results[i].err = b.fetcher.Fetch(ctx, ks.key, results[i].secret)
			cancel()
			b.stats.fetches.Add(1)
		}
		<-b.fetchSlots

		ks.mu.Lock()
		failed := false
		for _, r := range results {
			if r.err != nil {
				failed = true
				b.stats.fetchErrors.Add(1)
				b.log.WithError(r.err).WithField("key", ks.key.String()).Error("fetch failed; clients keep their last state until a retry succeeds")
				continue
			}
			if g := ks.groups[r.secret]; g != nil {
				b.fanOut(ks, g, r.rows, seq)
			}
		}
		if failed {
			b.scheduleRetry(ks)
		} else {
			ks.retry = 0
		}
		if ks.notified.Swap(false) {
			ks.dirty = true
		}
		if !ks.dirty || ks.nsubs == 0 || b.ctx.Err() != nil {
			ks.running.Store(false)
			empty := ks.nsubs == 0
			ks.mu.Unlock()
			// A receive that saw running still true left its notification
			// to this round: take it up now.
			if ks.notified.Load() {
				ks.mu.Lock()
				if ks.notified.Swap(false) {
					b.request(ks)
				}
				ks.mu.Unlock()
			}
			if empty {
				b.maybeRemove(ks)
			}
			return
		}
		ks.mu.Unlock()
	}
}

// fanOut hands the group's clients the new rows, unless they already have
// them. With ks.mu held.
func (b *Bridge) fanOut(ks *keyState, g *group, rows [][]byte, seq uint64) {
	u := g.current
	if u == nil || !sameRows(u.Rows, rows) {
		u = &Update{Key: ks.key, Rows: rows, Seq: seq}
		g.current = u
	}
	n := 0
	for c, sent := range g.clients {
		if sent >= u.Seq {
			continue
		}
		g.clients[c] = u.Seq
		cu := u
		if b.opts.Filter != nil {
			if cu = b.filter(c, u); cu == nil {
				continue
			}
		}
		if !c.out.push(cu) {
			b.stats.overflows.Add(1)
			continue
		}
		n++
	}
	b.stats.deliveries.Add(uint64(n))
}

// filter applies Options.Filter for one client. It returns u itself when the
// filter kept every row, and nil (send nothing) when the filter panicked.
func (b *Bridge) filter(c *Client, u *Update) (out *Update) {
	defer func() {
		if r := recover(); r != nil {
			b.log.WithField("key", u.Key.String()).Errorf("row filter panicked; client gets nothing for this change: %v", r)
			out = nil
		}
	}()
	rows := b.opts.Filter(c.ctx, u.Key, u.Rows)
	if len(rows) == len(u.Rows) && (len(rows) == 0 || &rows[0] == &u.Rows[0]) {
		return u
	}
	return &Update{Key: u.Key, Rows: rows, Seq: u.Seq}
}

func sameRows(a, b [][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !bytes.Equal(a[i], b[i]) {
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
		b.request(ks)
		ks.mu.Unlock()
	})
}

// maybeRemove drops ks from the index once nobody subscribes and no round
// runs.
func (b *Bridge) maybeRemove(ks *keyState) {
	sh := b.shard(ks.key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	ks.mu.Lock()
	defer ks.mu.Unlock()
	if ks.nsubs > 0 || ks.running.Load() || ks.removed {
		return
	}
	ks.removed = true
	if ks.timer != nil {
		ks.timer.Stop()
		ks.timer = nil
	}
	if sh.keys[ks.key] == ks {
		delete(sh.keys, ks.key)
	}
}
