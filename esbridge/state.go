package esbridge

import (
	"bytes"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/shared"
)

// What the bridge derives from a state's rows (its version, a collection's
// row ids and the difference between two states) is computed once per state
// or pair of states, on first use, and shared by every client and every
// copy of the update: a change costs one hash and one diff per server, not
// one per subscriber.

// Collections is implemented by a Fetcher that knows collections, as
// *esdb.DatabaseHub does (see esdb.DatabaseHub.RegisterCollection): RowID
// returns how to name an entity type's rows, nil for an entity type that
// is not a collection.
type Collections interface {
	RowID(entity shared.EntityType) esdb.RowID
}

// collection is what the bridge keeps for a collection key.
type collection struct {
	rowID esdb.RowID
	log   logrus.FieldLogger

	mu     sync.Mutex
	warned time.Time // when rows without a usable id were last logged
}

// badIDWarnEvery is how often, at most, rows without a usable id are logged
// per key: a fetch that keeps returning them must not flood the log.
const badIDWarnEvery = time.Minute

// derived holds what is computed from a state's rows, once.
type derived struct {
	versionOnce sync.Once
	version     string
	idsOnce     sync.Once
	ids         []string
	indexOnce   sync.Once
	index       map[string]int // id -> position
}

// canon returns the update whose rows u carries: u itself, or the original
// of a copy or view.
func (u *Update) canon() *Update {
	if u.state != nil {
		return u.state
	}
	return u
}

// Collection reports whether the update is about a collection key, whose
// rows have ids (see IDs).
func (u *Update) Collection() bool { return u.coll != nil }

// Version returns the version of the update's state: shared.Version of its
// rows, computed once per state.
func (u *Update) Version() string {
	s := u.canon()
	s.derived.versionOnce.Do(func() { s.derived.version = shared.Version(s.Rows) })
	return s.derived.version
}

// IDs returns the ids of a collection state's rows, parallel to Rows (an
// empty slice for a collection with no rows), or nil when the key is not a
// collection. They are unique: a row without a usable id is named
// "#<index>" (see esdb.DatabaseHub.RegisterCollection). The slice is shared:
// do not modify it.
func (u *Update) IDs() []string {
	s := u.canon()
	if s.coll == nil {
		return nil
	}
	s.derived.idsOnce.Do(func() { s.derived.ids = s.coll.name(s.Key, s.Rows) })
	return s.derived.ids
}

// index returns a collection state's positions by id.
func (u *Update) index() map[string]int {
	s := u.canon()
	s.derived.indexOnce.Do(func() {
		ids := s.IDs()
		m := make(map[string]int, len(ids))
		for i, id := range ids {
			m[id] = i
		}
		s.derived.index = m
	})
	return s.derived.index
}

// Full returns the update a view presents (see Diff and Unchanged), with
// the same Key, Rows and Seq; for any other update, u itself. A transport
// that sends only full states sends Full.
func (u *Update) Full() *Update {
	if u.full != nil {
		return u.full
	}
	return u
}

// Diff returns, for a view of a collection state made for a client that
// holds another state, that state's version and the change from it to this
// one; "" and nil for any other update. Sending the change instead of the
// rows is the transport's choice (it may compare sizes); either way the
// client holds this state afterwards.
func (u *Update) Diff() (base string, d *Diff) { return u.base, u.diff }

// Unchanged reports whether the update is a view made for a client that
// already holds this state (it said so when subscribing, or the state came
// back to rows it holds): the transport can say so instead of resending the
// rows.
func (u *Update) Unchanged() bool { return u.unchanged }

// Diff is the change from one state of a collection key to another, as
// positions in the new state and ids.
type Diff struct {
	// Upsert holds the positions, in the new state's Rows and IDs, of the
	// rows that are new or whose bytes changed, in the new state's order.
	Upsert []int
	// Remove holds the ids of the old state's rows that the new one lacks.
	Remove []string
	// Order is the new state's ids when removing Remove from the old state
	// and then replacing each Upsert row in place or appending it at the end
	// would not give the new state's order; nil otherwise.
	Order []string
}

// diffStates computes the change from base to next, two states of one
// collection key.
func diffStates(base, next *Update) *Diff {
	bIDs, nIDs := base.IDs(), next.IDs()
	bIndex, nIndex := base.index(), next.index()
	d := &Diff{}
	for _, id := range bIDs {
		if _, ok := nIndex[id]; !ok {
			d.Remove = append(d.Remove, id)
		}
	}
	for i, id := range nIDs {
		if j, ok := bIndex[id]; !ok || !bytes.Equal(base.Rows[j], next.Rows[i]) {
			d.Upsert = append(d.Upsert, i)
		}
	}
	// Applied to base, the change gives base's kept rows in base's order,
	// then the added rows in the order of Upsert: compare with next's order.
	k := 0
	inOrder := true
	for _, id := range bIDs {
		if _, kept := nIndex[id]; kept {
			if nIDs[k] != id {
				inOrder = false
				break
			}
			k++
		}
	}
	for _, i := range d.Upsert {
		if !inOrder {
			break
		}
		if _, existed := bIndex[nIDs[i]]; !existed {
			inOrder = nIDs[k] == nIDs[i]
			k++
		}
	}
	if !inOrder {
		d.Order = nIDs
	}
	return d
}

// Memo ids of the views and diffs an update carries.
type (
	diffKey      struct{ base string } // on the original state: *Diff from the state with that version
	viewKey      struct{ base string } // on the update delivered: its view for a client at that base
	unchangedKey struct{}              // on the update delivered: its "you have it" view
)

// viewFrom returns u as a client holding base sees it: an Unchanged view
// when base has u's rows, else a Diff view. Views, and the diff under
// them, are made once per base version and shared. They keep base's
// version, never base itself, so a chain of states is not kept alive.
func (u *Update) viewFrom(base *Update) *Update {
	v := base.Version()
	if v == u.Version() {
		return u.unchangedView()
	}
	if view, ok := u.memoLookup(viewKey{v}); ok {
		return view.(*Update)
	}
	// Not inside the view's Memo: u may be the original, and Memo does
	// not nest on one update.
	d := u.canon().Memo(diffKey{v}, func(next *Update) any { return diffStates(base, next) }).(*Diff)
	return u.Memo(viewKey{v}, func(u *Update) any {
		return &Update{Key: u.Key, Rows: u.Rows, Seq: u.Seq, group: u.group, coll: u.coll,
			state: u.canon(), full: u, base: v, diff: d}
	}).(*Update)
}

// unchangedView returns u's view for a client that holds u's state.
func (u *Update) unchangedView() *Update {
	return u.Memo(unchangedKey{}, func(u *Update) any {
		return &Update{Key: u.Key, Rows: u.Rows, Seq: u.Seq, group: u.group, coll: u.coll,
			state: u.canon(), full: u, unchanged: true}
	}).(*Update)
}

// name returns the ids of a fetch's rows: the application's, made unique
// (see esdb.DatabaseHub.RegisterCollection).
func (c *collection) name(key shared.EntityKey, rows [][]byte) []string {
	ids := make([]string, len(rows))
	var bad []int
	var firstErr error
	seen := make(map[string]struct{}, len(rows))
	for i, r := range rows {
		id, err := c.id(r)
		if err == nil && id == "" {
			err = fmt.Errorf("empty id")
		}
		if err == nil {
			if _, dup := seen[id]; dup {
				err = fmt.Errorf("id %.64q repeats an earlier row's", id)
			}
		}
		if err != nil {
			bad = append(bad, i)
			if firstErr == nil {
				firstErr = fmt.Errorf("row %d: %w", i, err)
			}
			continue
		}
		ids[i] = id
		seen[id] = struct{}{}
	}
	for _, i := range bad {
		// "#<index>", unless a row's own id reads so: then the first free
		// "#<index>~<n>", so that ids stay unique whatever the rows say.
		id := "#" + strconv.Itoa(i)
		for n := 1; ; n++ {
			if _, taken := seen[id]; !taken {
				break
			}
			id = "#" + strconv.Itoa(i) + "~" + strconv.Itoa(n)
		}
		ids[i] = id
		seen[id] = struct{}{}
	}
	if len(bad) > 0 {
		c.warn(key, len(bad), len(rows), firstErr)
	}
	return ids
}

// id runs the application's RowID, turning a panic into an error.
func (c *collection) id(row []byte) (id string, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("row id function panicked: %v", r)
		}
	}()
	return c.rowID(row)
}

func (c *collection) warn(key shared.EntityKey, bad, total int, first error) {
	c.mu.Lock()
	now := time.Now()
	due := now.Sub(c.warned) >= badIDWarnEvery
	if due {
		c.warned = now
	}
	c.mu.Unlock()
	if due {
		c.log.WithField("key", key.String()).WithError(first).Errorf(
			"%d of %d rows have no usable id (empty, unreadable or repeated); they are sent as \"#<index>\": fix the fetch or the row id function (logged at most once a minute per key)", bad, total)
	}
}
