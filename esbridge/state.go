package esbridge

import (
	"bytes"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
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

// collection is what the bridge keeps for a collection key (which has one
// group: its rows never depend on the secret).
type collection struct {
	rowID esdb.RowID
	log   logrus.FieldLogger

	// Guarded by the key's mu. history holds the states before the
	// current one, newest first, so that a client resuming from one of
	// them gets a diff (Options.KeptStates). differs counts the
	// subscribers whose client accepts diffs: only then are diffs worth
	// preparing before a fan-out.
	history []*Update
	differs int

	mu     sync.Mutex
	warned time.Time // when rows without a usable id were last logged
}

// badIDWarnEvery is how often, at most, rows without a usable id are logged
// per key: a fetch that keeps returning them must not flood the log.
const badIDWarnEvery = time.Minute

// view is what makes an update a view of a state for the clients at one
// base: the update it presents (same Seq), and either the change from the
// base or the fact that the client holds this state already.
type view struct {
	full      *Update
	base      string // the version of the state the client holds
	diff      *Diff
	unchanged bool
}

// derived holds what is computed from a state's rows, once.
type derived struct {
	versionOnce sync.Once
	version     string
	idsOnce     sync.Once
	ids         []string
	named       bool           // every id is the application's (none "#<index>")
	idsDone     atomic.Bool    // ids is set
	index       map[string]int // id -> position, made with ids
}

// canon returns the update whose rows u carries: u itself, or the original
// of a copy or view.
func (u *Update) canon() *Update {
	if u.state != nil {
		return u.state
	}
	return u
}

// lazy returns the state's derived values, made on first use (most
// updates of a raw-dialect server never need them).
func (u *Update) lazy() *derived {
	s := u.canon()
	if d := s.derived.Load(); d != nil {
		return d
	}
	s.derived.CompareAndSwap(nil, &derived{})
	return s.derived.Load()
}

// Collection reports whether the update is about a collection key, whose
// rows have ids (see IDs).
func (u *Update) Collection() bool { return u.coll != nil }

// Version returns the version of the update's state: shared.Version of its
// rows, computed once per state.
func (u *Update) Version() string {
	d := u.lazy()
	d.versionOnce.Do(func() { d.version = shared.Version(u.Rows) })
	return d.version
}

// IDs returns the ids of a collection state's rows, parallel to Rows (an
// empty slice for a collection with no rows), or nil when the key is not a
// collection. They are unique: a row without a usable id is named
// "#<index>" (see esdb.DatabaseHub.RegisterCollection). The slice is shared:
// do not modify it.
func (u *Update) IDs() []string {
	if u.coll == nil {
		return nil
	}
	s := u.canon()
	d := s.lazy()
	d.idsOnce.Do(func() {
		var prevIDs []string
		var prevRows [][]byte
		if p := s.prev; p != nil {
			// Its ids are known (see idsKnown), so this costs nothing.
			if ids := p.IDs(); p.lazy().named {
				prevIDs, prevRows = ids, p.Rows
			}
		}
		s.prev = nil // not kept alive by its successor
		d.ids, d.index, d.named = s.coll.name(s.Key, s.Rows, prevRows, prevIDs)
		d.idsDone.Store(true)
	})
	return d.ids
}

// idsKnown reports whether IDs has been computed: only then is the state
// worth handing to its successor (which would otherwise keep it alive, and
// maybe a chain of predecessors, until its own ids are asked for).
func (u *Update) idsKnown() bool {
	d := u.canon().derived.Load()
	return d != nil && d.idsDone.Load()
}

// index returns a collection state's positions by id.
func (u *Update) index() map[string]int {
	u.IDs()
	return u.lazy().index
}

// Full returns the update a view presents (see Diff and Unchanged), with
// the same Key, Rows and Seq; for any other update, u itself. A transport
// that sends only full states sends Full.
func (u *Update) Full() *Update {
	if u.view != nil {
		return u.view.full
	}
	return u
}

// Diff returns, for a view of a collection state made for a client that
// holds another state, that state's version and the change from it to this
// one; "" and nil for any other update. Sending the change instead of the
// rows is the transport's choice (it may compare sizes); either way the
// client holds this state afterwards.
func (u *Update) Diff() (base string, d *Diff) {
	if u.view == nil {
		return "", nil
	}
	return u.view.base, u.view.diff
}

// Unchanged reports whether the update is a view made for a client that
// said, when subscribing, that it holds this state: the transport can say
// so instead of resending the rows.
func (u *Update) Unchanged() bool { return u.view != nil && u.view.unchanged }

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

// viewFrom returns u as a client holding base sees it: a Diff view (an
// empty one when base has u's rows: the state came back to rows a client
// that skipped the states between holds; "unchanged" is kept for answers to
// a subscribe). Views, and the diff under them, are made once per base
// version and shared. They keep base's version, never base itself, so a
// chain of states is not kept alive.
func (u *Update) viewFrom(base *Update) *Update {
	v := base.Version()
	if view, ok := u.memoLookup(viewKey{v}); ok {
		return view.(*Update)
	}
	// Not inside the view's Memo: u may be the original, and Memo does
	// not nest on one update.
	d := u.canon().Memo(diffKey{v}, func(next *Update) any { return diffStates(base, next) }).(*Diff)
	return u.Memo(viewKey{v}, func(u *Update) any {
		return &Update{Key: u.Key, Rows: u.Rows, Seq: u.Seq, group: u.group, coll: u.coll,
			state: u.canon(), view: &view{full: u, base: v, diff: d}}
	}).(*Update)
}

// unchangedView returns u's view for a client that holds u's state.
func (u *Update) unchangedView() *Update {
	return u.Memo(unchangedKey{}, func(u *Update) any {
		return &Update{Key: u.Key, Rows: u.Rows, Seq: u.Seq, group: u.group, coll: u.coll,
			state: u.canon(), view: &view{full: u, unchanged: true}}
	}).(*Update)
}

// name returns the ids of a fetch's rows: the application's, made unique
// (see esdb.DatabaseHub.RegisterCollection), and whether none had to be
// made up. A row with the same bytes at the same place as in the previous
// state (prevRows, named prevIDs) keeps its id without asking RowID: most
// of a collection's rows do not change from one state to the next.
func (c *collection) name(key shared.EntityKey, rows, prevRows [][]byte, prevIDs []string) (ids []string, index map[string]int, named bool) {
	ids = make([]string, len(rows))
	var bad []int
	var firstErr error
	seen := make(map[string]int, len(rows)) // id -> position: the state's index
	for i, r := range rows {
		var id string
		var err error
		if i < len(prevIDs) && bytes.Equal(prevRows[i], r) {
			id = prevIDs[i]
		} else {
			id, err = c.id(r)
		}
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
		seen[id] = i
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
		seen[id] = i
	}
	if len(bad) > 0 {
		c.warn(key, len(bad), len(rows), firstErr)
	}
	return ids, seen, len(bad) == 0
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
