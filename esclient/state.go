package esclient

import (
	"bytes"
	"encoding/json"
	"slices"

	"github.com/entity-sync/entity-sync/shared"
)

// How the client applies the server's state frames to what it holds of a
// key (docs/protocol.md, "How a client applies state frames"): "rows" and
// "gone" replace it, "diff" changes it if the client holds the diff's base
// and otherwise asks for the key again, "unchanged" keeps it. For a
// collection key (one whose frames carry ids) the client keeps the rows by
// id and works out what changed for the application.

// Snapshot is a key's state as handed to Handlers.Changes.
type Snapshot struct {
	// Rows are the key's rows in the server's order (none: gone), as Rows
	// receives them. Shared: do not modify.
	Rows []json.RawMessage
	// IDs are a collection's row ids, parallel to Rows; nil for a key that
	// is not a collection.
	IDs []string
	// Changes are what changed since the previous state this subscription
	// was handed: rows removed (in the old order), then rows added or
	// modified (in the new order). The first state of a subscription is
	// all additions. Empty for a key that is not a collection.
	Changes []Change
	// Version is the state's version, the one the client sends back when it
	// subscribes again after a reconnect.
	Version string
}

// ChangeType says how a row changed.
type ChangeType string

// The kinds of change, as Firestore's docChanges names them.
const (
	Added    ChangeType = "added"
	Modified ChangeType = "modified"
	Removed  ChangeType = "removed"
)

// Change is one row's change in a collection.
type Change struct {
	Type ChangeType
	ID   string
	// Row is the row as it is now; for Removed, as it was.
	Row json.RawMessage
}

// state is what the client holds of a key: the last state the server sent.
type state struct {
	has     bool
	version string
	ids     []string // a collection's, parallel to rows; nil otherwise
	rows    []json.RawMessage
}

func (st *state) gone() bool { return st.has && len(st.rows) == 0 }

// replace makes a full state (rows, gone) the held one and returns what
// changed from the old one, matched by id (a row's bytes decide whether it
// was modified).
func (st *state) replace(version string, ids []string, rows []json.RawMessage) []Change {
	old := *st
	*st = state{has: true, version: version, ids: ids, rows: rows}
	if ids == nil {
		if old.ids == nil {
			return nil
		}
		ids = []string{} // the collection has no rows (gone)
	}
	var changes []Change
	now := make(map[string]int, len(ids))
	for i, id := range ids {
		now[id] = i
	}
	before := make(map[string]int, len(old.ids))
	for i, id := range old.ids {
		before[id] = i
		if _, kept := now[id]; !kept {
			changes = append(changes, Change{Type: Removed, ID: id, Row: old.rows[i]})
		}
	}
	for i, id := range ids {
		switch j, had := before[id]; {
		case !had:
			changes = append(changes, Change{Type: Added, ID: id, Row: rows[i]})
		case !bytes.Equal(old.rows[j], rows[i]):
			changes = append(changes, Change{Type: Modified, ID: id, Row: rows[i]})
		}
	}
	return changes
}

// diffFrame is the part of a "diff" frame the client applies.
type diffFrame struct {
	Base   string
	Upsert []upsert
	Remove []string
	Order  []string
}

type upsert struct {
	ID  string          `json:"id"`
	Row json.RawMessage `json:"row"`
}

// applyDiff changes the held collection state as the diff says and returns
// what changed. ok is false, and nothing is changed, when the client does
// not hold the diff's base state.
func (st *state) applyDiff(version string, d diffFrame) (changes []Change, ok bool) {
	if !st.has || st.version != d.Base || st.ids == nil && len(st.rows) > 0 {
		return nil, false
	}
	pos := make(map[string]int, len(st.ids))
	for i, id := range st.ids {
		pos[id] = i
	}
	// New slices: the old ones were handed to the application.
	ids := make([]string, 0, len(st.ids)+len(d.Upsert))
	rows := make([]json.RawMessage, 0, cap(ids))
	removed := make(map[string]bool, len(d.Remove))
	for _, id := range d.Remove {
		if i, ok := pos[id]; ok && !removed[id] {
			removed[id] = true
			changes = append(changes, Change{Type: Removed, ID: id, Row: st.rows[i]})
		}
	}
	for i, id := range st.ids {
		if !removed[id] {
			ids = append(ids, id)
			rows = append(rows, st.rows[i])
		}
	}
	at := make(map[string]int, len(ids))
	for i, id := range ids {
		at[id] = i
	}
	for _, u := range d.Upsert {
		if i, ok := at[u.ID]; ok {
			rows[i] = u.Row
			changes = append(changes, Change{Type: Modified, ID: u.ID, Row: u.Row})
			continue
		}
		at[u.ID] = len(ids)
		ids = append(ids, u.ID)
		rows = append(rows, u.Row)
		changes = append(changes, Change{Type: Added, ID: u.ID, Row: u.Row})
	}
	if d.Order != nil {
		if len(d.Order) != len(ids) {
			return nil, false // not the state the server means: ask again
		}
		ordered := make([]json.RawMessage, len(ids))
		for i, id := range d.Order {
			j, ok := at[id]
			if !ok {
				return nil, false
			}
			ordered[i] = rows[j]
		}
		ids, rows = slices.Clone(d.Order), ordered
	}
	*st = state{has: true, version: version, ids: ids, rows: rows}
	return changes, true
}

// snapshot returns the held state as the application gets it, with all
// rows added: for a handle that joins a subscription that has a state.
func (st *state) snapshot() Snapshot {
	s := Snapshot{Rows: st.rows, IDs: st.ids, Version: st.version}
	for i, id := range st.ids {
		s.Changes = append(s.Changes, Change{Type: Added, ID: id, Row: st.rows[i]})
	}
	return s
}

// subscribeBody is a subscribe request's body: the key and, when the client
// holds a state of it, that state's version.
type subscribeBody struct {
	Entity  shared.EntityType `json:"entity"`
	ID      string            `json:"id"`
	Version string            `json:"version,omitempty"`
}
