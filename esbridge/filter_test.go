package esbridge_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/shared"
)

// abc is a fetcher whose every key has the rows "A", "B", "C" (each with
// the fetch's number, so every change is a new state).
type abc struct{ n atomic.Int64 }

func (f *abc) Fetch(context.Context, shared.EntityKey, string) ([][]byte, error) {
	n := f.n.Add(1)
	return [][]byte{fmt.Appendf(nil, "A%d", n), fmt.Appendf(nil, "B%d", n), fmt.Appendf(nil, "C%d", n)}, nil
}

func (f *abc) PerSecret(shared.EntityType) bool { return false }

type restrictedKey struct{}

// rowNames returns the rows' first letters ("" for an empty row).
func rowNames(u *esbridge.Update) string {
	var names []string
	for _, r := range u.Rows {
		if len(r) == 0 {
			names = append(names, `""`)
		} else {
			names = append(names, string(r[:1]))
		}
	}
	return strings.Join(names, ",")
}

// A filter written the usual Go way edits the slice it is given in place
// (slices.DeleteFunc, or rows[:0] and append). That must only change what
// its own client gets: an unrestricted client of the same key still gets
// every row, at subscribe and at every change.
func TestFilterEditingItsSliceInPlaceLeavesOtherClientsAlone(t *testing.T) {
	isB := func(r []byte) bool { return len(r) > 0 && r[0] == 'B' }
	filters := map[string]func([][]byte) [][]byte{
		"DeleteFunc": func(rows [][]byte) [][]byte { return slices.DeleteFunc(rows, isB) },
		"append to rows[:0]": func(rows [][]byte) [][]byte {
			out := rows[:0]
			for _, r := range rows {
				if !isB(r) {
					out = append(out, r)
				}
			}
			return out
		},
		"overwrite in place": func(rows [][]byte) [][]byte {
			for i, r := range rows {
				if isB(r) {
					rows[i] = []byte("X")
				}
			}
			return rows
		},
	}
	for name, edit := range filters {
		t.Run(name, func(t *testing.T) {
			b := newUnitBridge(t, &abc{}, esbridge.Options{
				Filter: func(ctx context.Context, _ shared.EntityKey, rows [][]byte) [][]byte {
					if ctx.Value(restrictedKey{}) != nil {
						return edit(rows)
					}
					return rows
				},
			})
			restricted := b.ClientBuilder(context.WithValue(context.Background(), restrictedKey{}, true))
			if err := restricted.Subscribe(k1); err != nil {
				t.Fatal(err)
			}
			want := "A,C"
			if name == "overwrite in place" {
				want = "A,X,C"
			}
			if got := rowNames(nextOne(t, restricted, k1)); got != want {
				t.Fatalf("restricted client got %s, want %s", got, want)
			}
			open := b.ClientBuilder(nil)
			if err := open.Subscribe(k1); err != nil { // the state the restricted client was sent
				t.Fatal(err)
			}
			if got := rowNames(nextOne(t, open, k1)); got != "A,B,C" {
				t.Fatalf("unrestricted client subscribing after a restricted one got %s, want A,B,C", got)
			}
			for range 5 {
				if err := b.NotifyAllOfChange(k1); err != nil {
					t.Fatal(err)
				}
				if got := rowNames(nextOne(t, restricted, k1)); got != want {
					t.Fatalf("restricted client got %s, want %s", got, want)
				}
				if got := rowNames(nextOne(t, open, k1)); got != "A,B,C" {
					t.Fatalf("unrestricted client got %s after a change, want A,B,C", got)
				}
			}
			late := b.ClientBuilder(nil)
			if err := late.Subscribe(k1); err != nil {
				t.Fatal(err)
			}
			if got := rowNames(nextOne(t, late, k1)); got != "A,B,C" {
				t.Fatalf("a later unrestricted client got %s, want A,B,C", got)
			}
		})
	}
}
