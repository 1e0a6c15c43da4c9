package testkit

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/entity-sync/entity-sync/shared"
)

// Collection is the store of a collection entity type in tests: per key,
// an ordered list of JSON rows {"id":"...","text":"...","rev":N} with unique
// ids. Fetch returns a key's rows in order.
type Collection struct {
	mu    sync.Mutex
	lists map[string][]CollectionRow // by key id
	next  int                        // for fresh row ids and revisions

	fetches atomic.Int64
}

// CollectionRow is one row of a Collection.
type CollectionRow struct {
	ID   string `json:"id"`
	Text string `json:"text"`
	Rev  int    `json:"rev"`
}

// NewCollection returns an empty store.
func NewCollection() *Collection {
	return &Collection{lists: make(map[string][]CollectionRow)}
}

// Fetch is the entity's fetch function.
func (c *Collection) Fetch(_ context.Context, key shared.EntityKey) ([][]byte, error) {
	c.fetches.Add(1)
	return c.Rows(key.ID), nil
}

// Fetches returns how often Fetch was called.
func (c *Collection) Fetches() int64 { return c.fetches.Load() }

// Rows returns list's rows as Fetch does.
func (c *Collection) Rows(list string) [][]byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	rows := make([][]byte, len(c.lists[list]))
	for i, r := range c.lists[list] {
		rows[i], _ = json.Marshal(r)
	}
	return rows
}

// Len returns how many rows list has.
func (c *Collection) Len(list string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.lists[list])
}

// Fill gives list n rows with ids "r0".."r<n-1>" and texts of size bytes.
func (c *Collection) Fill(list string, n, size int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	rows := make([]CollectionRow, n)
	for i := range rows {
		rows[i] = CollectionRow{ID: "r" + strconv.Itoa(i), Text: text(size, i)}
	}
	c.lists[list] = rows
}

func text(size, seed int) string {
	b := make([]byte, size)
	for i := range b {
		b[i] = 'a' + byte((seed+i)%26)
	}
	return string(b)
}

// Set replaces row id's text in place, or appends a new row.
func (c *Collection) Set(list, id, text string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.next++
	rows := c.lists[list]
	if i := slices.IndexFunc(rows, func(r CollectionRow) bool { return r.ID == id }); i >= 0 {
		rows[i].Text, rows[i].Rev = text, c.next
		return
	}
	c.lists[list] = append(rows, CollectionRow{ID: id, Text: text, Rev: c.next})
}

// Insert inserts a new row at position at (clamped).
func (c *Collection) Insert(list string, at int, id, text string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.next++
	rows := c.lists[list]
	c.lists[list] = slices.Insert(rows, min(max(at, 0), len(rows)), CollectionRow{ID: id, Text: text, Rev: c.next})
}

// Delete removes row id.
func (c *Collection) Delete(list, id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.lists[list] = slices.DeleteFunc(c.lists[list], func(r CollectionRow) bool { return r.ID == id })
}

// Move moves row id to position to (clamped).
func (c *Collection) Move(list, id string, to int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	rows := c.lists[list]
	i := slices.IndexFunc(rows, func(r CollectionRow) bool { return r.ID == id })
	if i < 0 {
		return
	}
	r := rows[i]
	rows = slices.Delete(rows, i, i+1)
	c.lists[list] = slices.Insert(rows, min(max(to, 0), len(rows)), r)
}

// Random makes one random change to list and says what it did: an insert
// at a random place or at the end, an update, a delete or a move, chosen
// so that the list's length drifts around maxLen/2.
func (c *Collection) Random(list string, r *rand.Rand, maxLen int) string {
	c.mu.Lock()
	n := len(c.lists[list])
	c.next++
	id := "n" + strconv.Itoa(c.next)
	var existing string
	if n > 0 {
		existing = c.lists[list][r.IntN(n)].ID
	}
	c.mu.Unlock()
	op := r.IntN(10)
	switch {
	case n == 0 || op < 2 && n < maxLen:
		c.Set(list, id, text(8, r.IntN(100)))
		return "append " + id
	case op < 4 && n < maxLen:
		at := r.IntN(n + 1)
		c.Insert(list, at, id, text(8, r.IntN(100)))
		return fmt.Sprintf("insert %s at %d", id, at)
	case op < 7:
		c.Set(list, existing, text(8, r.IntN(100)))
		return "update " + existing
	case op < 9:
		c.Delete(list, existing)
		return "delete " + existing
	default:
		to := r.IntN(n)
		c.Move(list, existing, to)
		return fmt.Sprintf("move %s to %d", existing, to)
	}
}
