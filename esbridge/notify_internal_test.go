package esbridge

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/entity-sync/entity-sync/shared"
)

// notifications splits keys into messages within the limit, one entity
// type per message, each key exactly once, in the order given.
func TestNotificationsFitTheLimit(t *testing.T) {
	seed := rand.Uint64()
	r := rand.New(rand.NewPCG(seed, 1))
	for round := 0; round < 200; round++ {
		limit := 0
		if r.IntN(4) > 0 {
			limit = 300 + r.IntN(3000)
		}
		var keys []shared.EntityKey
		for i := r.IntN(200); i >= 0; i-- {
			id := fmt.Sprintf("%d%s\"<", r.IntN(50), strings.Repeat("é", r.IntN(100)))
			keys = append(keys, shared.EntityKey{Entity: shared.EntityType("t" + fmt.Sprint(r.IntN(3))), ID: id})
		}
		msgs, err := notifications(keys, limit)
		if err != nil {
			t.Fatal(err)
		}
		var got []shared.EntityKey
		for _, m := range msgs {
			if limit > 0 && len(m.body) > limit {
				t.Fatalf("seed %d: a %d-byte message for limit %d: %s", seed, len(m.body), limit, m.body)
			}
			var n shared.Notification
			if err := json.Unmarshal(m.body, &n); err != nil || n.Entity != m.entity {
				t.Fatalf("seed %d: message %s: %v", seed, m.body, err)
			}
			ids := n.IDs
			if n.ID != "" {
				ids = append(ids, n.ID)
			}
			if len(ids) != m.keys {
				t.Fatalf("seed %d: message %s counted %d keys", seed, m.body, m.keys)
			}
			for _, id := range ids {
				got = append(got, shared.EntityKey{Entity: n.Entity, ID: id})
			}
		}
		// Grouped by entity type, types in the order they first appear.
		var types []shared.EntityType
		byType := map[shared.EntityType][]shared.EntityKey{}
		for _, k := range keys {
			if slices.Contains(byType[k.Entity], k) {
				continue
			}
			if byType[k.Entity] == nil {
				types = append(types, k.Entity)
			}
			byType[k.Entity] = append(byType[k.Entity], k)
		}
		var want []shared.EntityKey
		for _, e := range types {
			want = append(want, byType[e]...)
		}
		if len(keys) > 1 && !slices.Equal(got, want) {
			t.Fatalf("seed %d: messages carry %v, want %v", seed, got, want)
		}
	}
}
