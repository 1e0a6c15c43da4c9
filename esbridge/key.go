package esbridge

import (
	"bytes"
	"sync"
	"sync/atomic"
	"time"

	"github.com/entity-sync/entity-sync/shared"
)

// Update is one state of one key as a group of clients sees it: the rows a
// fetch returned (none: the entity is gone) and the sequence number it was
// published with. The same *Update goes to every client of the group, so a
// transport encodes it once (see Memo).
//
// For a client that accepts differences (Client.AcceptDiffs), an update of a
// collection key (Collection) may instead be a view of the new state
// relative to the state the client holds: Diff reports the change from that
// state, Unchanged that the client already holds it. Such a view is shared
// by every client at the same base, and so is its encoding.
type Update struct {
	Key  shared.EntityKey
	Rows [][]byte
	// Seq is drawn from one counter per bridge (all keys) when the state is
	// published to its group, so it keeps growing across rounds, secret
	// changes, unsubscribe and subscribe again; a client never receives a
	// Seq that is not above the last one it got for the key.
	Seq uint64
	// Revoked means the client lost access to the key: no rows, and nothing
	// more will come for it.
	Revoked bool

	group string      // the secret group whose state this is ("" unless per secret)
	coll  *collection // the key's collection settings; nil: not a collection
	// state is the update whose rows this one carries, when it is a copy
	// under another Seq (withSeq) or a view; nil for the original. What is
	// derived from the rows (version, ids) lives on the original, made on
	// first use.
	state    *Update
	view     *view
	derived  atomic.Pointer[derived]
	rowBytes int // the rows' total length, for size: summed once, not per delivery
	// prev is the collection state this one replaced, until IDs has used
	// it: a row with the same bytes at the same place has the same id.
	prev *Update

	memoMu sync.Mutex                // serialises building
	memo   atomic.Pointer[memoEntry] // the newest entry; read without the lock
}

// memoEntry is one value of an update's Memo, in a list, newest first: an
// entry is never changed once stored, so readers need no lock, and adding
// one costs one allocation.
type memoEntry struct {
	id, value any
	next      *memoEntry
}

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
	u.memo.Store(&memoEntry{id: id, value: v, next: u.memo.Load()})
	return v
}

func (u *Update) memoLookup(id any) (any, bool) {
	for e := u.memo.Load(); e != nil; e = e.next {
		if e.id == id {
			return e.value, true
		}
	}
	return nil, false
}

// withSeq returns a copy of u's state under a new sequence number: how a
// client that may already have seen u's Seq gets the state again.
func (u *Update) withSeq(seq uint64) *Update {
	return &Update{Key: u.Key, Rows: u.Rows, Seq: seq, Revoked: u.Revoked, group: u.group, coll: u.coll, state: u.canon(), rowBytes: u.rowBytes}
}

// size is the update's weight against a client's MaxPendingBytes.
func (u *Update) size() int {
	n := 64
	if v := u.view; v != nil && v.unchanged {
		return n
	} else if v != nil {
		for _, i := range v.diff.Upsert {
			n += len(u.Rows[i])
		}
		return n
	}
	return n + u.rowBytes
}

// newState returns the update publishing rows as a key's new state.
func newState(key shared.EntityKey, rows [][]byte, seq uint64, group string, coll *collection) *Update {
	n := 0
	for _, r := range rows {
		n += len(r)
	}
	return &Update{Key: key, Rows: rows, Seq: seq, group: group, coll: coll, rowBytes: n}
}

// keyState is everything the bridge knows about one key with local
// subscribers. Its lock is only ever held for map updates and flag changes:
// fetches and fan-outs run without it, so a notification never waits for
// a long fan-out.
type keyState struct {
	key       shared.EntityKey
	perSecret bool
	coll      *collection // nil unless the key is a collection

	mu      sync.Mutex
	groups  map[string]*group // by secret; the only group is "" unless perSecret
	nsubs   int
	queued  bool // waiting in the bridge's work queue
	running bool // a worker runs a round of this key
	dirty   bool // notified since the last round started: fetch every group again
	// notified is when the first notification since the last round started
	// arrived (for Options.OnRound).
	notified time.Time
	removed  bool // dropped from the index; a new subscriber makes a new keyState
	// changes counts the notifications since sampled, the end of the
	// round that last measured the key's change rate; gap is the average
	// time between notifications (see keyState.pause), zero until known.
	changes int
	sampled time.Time
	gap     time.Duration
	// watching is set while the routing queue's Watch for the key runs: no
	// round may fetch before it returns. watched is set once it returned
	// (maybeRemove then calls Unwatch).
	watching, watched bool
	retry             time.Duration
	timer             *time.Timer
	// badUTF8 is set once a fetch of the key returned invalid UTF-8, so the
	// repair is logged once per key (see Bridge.validUTF8).
	badUTF8 atomic.Bool
}

// group is the clients of a key that see the same rows.
type group struct {
	members map[*Client]*subscription
	// snap lists the members' subscriptions for fan-outs, which iterate it
	// without the key's lock; a membership change makes a new one instead
	// of editing it.
	snap    []*subscription
	current *Update // the newest state published to the group, nil before the first fetch
	// stale means the group is new: its rows must be fetched even if no
	// notification arrived. (A failed fetch is retried by a timer instead.)
	stale bool
}

func (g *group) snapshot() []*subscription {
	if g.snap == nil {
		g.snap = make([]*subscription, 0, len(g.members))
		for _, s := range g.members {
			g.snap = append(g.snap, s)
		}
	}
	return g.snap
}

func (ks *keyState) groupName(secret string) string {
	if !ks.perSecret {
		return ""
	}
	return secret
}

// join puts s's client in the group name and returns the group. With ks.mu
// held.
func (ks *keyState) join(s *subscription, name string) *group {
	g := ks.groups[name]
	if g == nil {
		g = &group{members: make(map[*Client]*subscription), stale: true}
		ks.groups[name] = g
	}
	if _, ok := g.members[s.c]; !ok {
		ks.nsubs++
		if ks.coll != nil && s.c.diffs.Load() {
			ks.coll.differs++
		}
	}
	g.members[s.c] = s
	g.snap = nil
	return g
}

// leave takes c out of the group name. With ks.mu held.
func (ks *keyState) leave(c *Client, name string) {
	g := ks.groups[name]
	if g == nil {
		return
	}
	if _, ok := g.members[c]; ok {
		delete(g.members, c)
		g.snap = nil
		ks.nsubs--
		if ks.coll != nil && c.diffs.Load() {
			ks.coll.differs--
		}
	}
	if len(g.members) == 0 {
		delete(ks.groups, name)
	}
}

// needsRound reports whether some group's rows must be fetched. With ks.mu
// held.
func (ks *keyState) needsRound() bool {
	if ks.nsubs == 0 || ks.removed || ks.watching {
		return false
	}
	if ks.dirty {
		return true
	}
	for _, g := range ks.groups {
		if g.stale {
			return true
		}
	}
	return false
}

// publish makes u the group's current state. A collection's previous state
// joins its history, which keeps at most keep states and maxKeptBytes of
// rows. With ks.mu held.
func (ks *keyState) publish(g *group, u *Update, keep int) (prev *Update) {
	prev, g.current = g.current, u
	c := ks.coll
	if c != nil && prev != nil && prev.idsKnown() {
		u.prev = prev
	}
	if c == nil || prev == nil || keep <= 0 {
		return prev
	}
	c.history = append(c.history, nil)
	copy(c.history[1:], c.history)
	c.history[0] = prev
	total := 0
	for i, h := range c.history {
		total += h.size()
		if i >= keep || total > maxKeptBytes {
			clear(c.history[i:])
			c.history = c.history[:i]
			break
		}
	}
	return prev
}

// maxKeptBytes bounds the rows one collection key keeps in its history.
const maxKeptBytes = 8 << 20

// kept returns the collection key's state with the given version: g's
// current one or one from the history, or nil. With ks.mu held.
func (ks *keyState) kept(g *group, version string) *Update {
	if g.current != nil && g.current.Version() == version {
		return g.current
	}
	for _, h := range ks.coll.history {
		if h.Version() == version {
			return h
		}
	}
	return nil
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
