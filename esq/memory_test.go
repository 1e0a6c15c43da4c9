package esq

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"github.com/entity-sync/entity-sync/shared"
)

// A key published with PublishKey reaches a key subscriber as it is, and
// any other subscriber as the seed's JSON body; Publish's bodies always go
// to onMessage.
func TestMemoryPublishKey(t *testing.T) {
	m := NewMemory()
	var keys []shared.EntityKey
	var bodies []string
	if err := m.SubscribeKeys("items", func(b []byte) { bodies = append(bodies, string(b)) },
		func(k shared.EntityKey) { keys = append(keys, k) }, nil); err != nil {
		t.Fatal(err)
	}
	if err := m.Subscribe("lists", func(b []byte) { bodies = append(bodies, string(b)) }, nil); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, err := range []error{
		m.PublishKey(ctx, shared.EntityKey{Entity: "items", ID: "1"}),
		m.PublishKey(ctx, shared.EntityKey{Entity: "lists", ID: `a"b`}),
		m.PublishKey(ctx, shared.EntityKey{Entity: "nobody", ID: "1"}),
		m.Publish(ctx, "items", []byte(`{"entity":"items","ids":["2","3"]}`)),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	if len(keys) != 1 || keys[0] != (shared.EntityKey{Entity: "items", ID: "1"}) {
		t.Errorf("keys = %v", keys)
	}
	want := []string{`{"entity":"lists","id":"a\"b"}`, `{"entity":"items","ids":["2","3"]}`}
	if len(bodies) != 2 || bodies[0] != want[0] || bodies[1] != want[1] {
		t.Errorf("bodies = %q, want %q", bodies, want)
	}
	if err := m.SubscribeKeys("items", func([]byte) {}, nil, nil); !errors.Is(err, ErrAlreadySubscribed) {
		t.Errorf("second SubscribeKeys: %v", err)
	}
	if err := m.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.PublishKey(ctx, shared.EntityKey{Entity: "items", ID: "1"}); !errors.Is(err, ErrClosed) {
		t.Errorf("PublishKey after Close: %v", err)
	}
}

// KeyBody writes what json.Marshal writes for a key.
func TestKeyBody(t *testing.T) {
	for _, key := range []shared.EntityKey{
		{Entity: "items", ID: "100"},
		{Entity: "items", ID: `a"b\c`},
		{Entity: "items", ID: "<&>"},
		{Entity: "items", ID: "été"},
		{Entity: "items", ID: "a\u2028b"},
		{Entity: "items", ID: "\x7f"},
		{Entity: `it"ems`, ID: "1"},
	} {
		want, err := json.Marshal(key)
		if err != nil {
			t.Fatal(err)
		}
		if got := KeyBody(key); string(got) != string(want) {
			t.Errorf("KeyBody(%q) = %s; json.Marshal: %s", key, got, want)
		}
	}
}
