package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"

	"github.com/entity-sync/entity-sync/shared"
)

// entityLists is the collection entity type: key lists/L holds list L's
// items in order, each row {"id":ITEM,"text":TEXT,"n":CHANGES} named by its
// "id" field.
const entityLists shared.EntityType = "lists"

// listItem is one row of a list.
type listItem struct {
	ID   string `json:"id"`
	Text string `json:"text"`
	N    int    `json:"n"` // how often the item was written: every write changes the row
}

// lists is the shared "database" of the lists entity: items in order, by
// list id. A list with no items has no rows (the key is gone).
type lists struct {
	mu    sync.Mutex
	items map[string][]listItem
}

func newLists() *lists {
	return &lists{items: make(map[string][]listItem)}
}

func (l *lists) fetch(_ context.Context, key shared.EntityKey) ([][]byte, error) {
	l.mu.Lock()
	items := append([]listItem(nil), l.items[key.ID]...)
	l.mu.Unlock()
	rows := make([][]byte, 0, len(items))
	for _, it := range items {
		b, err := json.Marshal(it)
		if err != nil {
			return nil, err
		}
		rows = append(rows, b)
	}
	return rows, nil
}

// change applies one operation of the /list control endpoint to list id
// and returns the list's items after it.
//
//	op=add&item=X&text=T[&at=I]   insert item X at index I (default: the end)
//	op=set&item=X&text=T          change item X's text
//	op=remove&item=X              remove item X
//	op=move&item=X&at=I           move item X to index I
//	op=fill&n=K[&text=T]          replace the list with K items i0..i(K-1), text "T i"
func (l *lists) change(id string, q map[string][]string) ([]listItem, error) {
	get := func(name string) string {
		if v := q[name]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	items := append([]listItem(nil), l.items[id]...)
	find := func(item string) int {
		for i, it := range items {
			if it.ID == item {
				return i
			}
		}
		return -1
	}
	index := func(limit int) (int, error) {
		s := get("at")
		if s == "" {
			return limit, nil
		}
		at, err := strconv.Atoi(s)
		if err != nil || at < 0 || at > limit {
			return 0, fmt.Errorf("at must be 0..%d", limit)
		}
		return at, nil
	}
	item := get("item")
	op := get("op")
	switch op {
	case "add":
		if item == "" || find(item) >= 0 {
			return nil, errors.New("add needs an item id not in the list")
		}
		at, err := index(len(items))
		if err != nil {
			return nil, err
		}
		items = append(items[:at], append([]listItem{{ID: item, Text: get("text"), N: 1}}, items[at:]...)...)
	case "set":
		i := find(item)
		if i < 0 {
			return nil, fmt.Errorf("no item %q", item)
		}
		items[i].Text = get("text")
		items[i].N++
	case "remove":
		i := find(item)
		if i < 0 {
			return nil, fmt.Errorf("no item %q", item)
		}
		items = append(items[:i], items[i+1:]...)
	case "move":
		i := find(item)
		if i < 0 {
			return nil, fmt.Errorf("no item %q", item)
		}
		it := items[i]
		items = append(items[:i], items[i+1:]...)
		at, err := index(len(items))
		if err != nil {
			return nil, err
		}
		items = append(items[:at], append([]listItem{it}, items[at:]...)...)
	case "fill":
		n, err := strconv.Atoi(get("n"))
		if err != nil || n < 0 || n > 10000 {
			return nil, errors.New("fill needs n in 0..10000")
		}
		items = make([]listItem, n)
		for i := range items {
			items[i] = listItem{ID: "i" + strconv.Itoa(i), Text: fmt.Sprintf("%s %d", get("text"), i), N: 1}
		}
	default:
		return nil, fmt.Errorf("unknown op %q (add, set, remove, move, fill)", op)
	}
	l.items[id] = items
	return append([]listItem{}, items...), nil
}

// handleList serves /list?server=N&list=L&op=...: changes list L (see
// change), notifies lists/L from server N, and answers {"rows":[...]}, the
// list's items after the change.
func (h *harness) handleList(r *http.Request, s *server) (any, error) {
	id := r.URL.Query().Get("list")
	if id == "" {
		return nil, errors.New("list is required")
	}
	items, err := h.lists.change(id, r.URL.Query())
	if err != nil {
		return nil, err
	}
	if err := s.current().NotifyAllOfChange(shared.EntityKey{Entity: entityLists, ID: id}); err != nil {
		return nil, err
	}
	return map[string][]listItem{"rows": items}, nil
}
