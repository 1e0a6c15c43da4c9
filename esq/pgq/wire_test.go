package pgq

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/entity-sync/entity-sync/shared"
)

func TestWireRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name     string
		entity   shared.EntityType
		body     string
		verbatim bool
	}{
		{"key", "items", `{"entity":"items","id":"100"}`, true},
		{"stamped key", "items", `{"entity":"items","id":"100","_es":{"p":"9f2c41d07be36a58","n":42}}`, true},
		{"key of another type", "users", `{"entity":"items","id":"100"}`, false},
		{"mark", "items", `{"_es":{"p":"9f2c41d07be36a58","n":42}}`, false},
		{"not JSON", "items", "hello", false},
		{"empty", "items", "", false},
		{"JSON array", "items", `["items"]`, false},
		{"entity not a string", "items", `{"entity":5}`, false},
		{"looks like an envelope", "items", `{"entity":"items","_pgq":"aGk="}`, false},
		{"invalid UTF-8", "items", "{\"entity\":\"items\",\"id\":\"\xff\"}", false},
		{"NUL", "items", "a\x00b", false},
		{"unicode entity", "élément", `{"entity":"élément","id":"1"}`, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			payload, err := encode(tc.entity, []byte(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			if got := payload == tc.body; got != tc.verbatim {
				t.Errorf("payload %s: verbatim %v, want %v", payload, got, tc.verbatim)
			}
			if strings.IndexByte(payload, 0) >= 0 {
				t.Errorf("payload %q holds a NUL byte", payload)
			}
			entity, body, _, ok := decode([]byte(payload))
			if !ok || entity != tc.entity || !bytes.Equal(body, []byte(tc.body)) {
				t.Errorf("decode(%s) = %q, %q, %v; want %q, %q", payload, entity, body, ok, tc.entity, tc.body)
			}
		})
	}
}

func TestWireUndispatchable(t *testing.T) {
	for _, p := range []string{``, `{"id":"100"}`, `{"entity":""}`, `null`, `not json`, `{"entity":"items"`} {
		if e, _, _, ok := decode([]byte(p)); ok {
			t.Errorf("decode(%s) dispatched to %q", p, e)
		}
	}
}

func TestWireLimit(t *testing.T) {
	prefix := `{"entity":"items","id":"`
	fit := prefix + strings.Repeat("x", MaxPayload-len(prefix)-2) + `"}`
	if p, err := encode("items", []byte(fit)); err != nil || len(p) != MaxPayload {
		t.Fatalf("a %d-byte key: %d bytes, %v", len(fit), len(p), err)
	}
	over := prefix + strings.Repeat("x", MaxPayload-len(prefix)-1) + `"}`
	if _, err := encode("items", []byte(over)); !errors.Is(err, ErrPayloadTooLarge) {
		t.Fatalf("a %d-byte key: %v, want ErrPayloadTooLarge", len(over), err)
	}
	if _, err := encode("", []byte(fit)); err == nil {
		t.Fatal("empty entity type accepted")
	}
}

func TestTriggerSQLQuoting(t *testing.T) {
	s, err := TriggerSQL(Trigger{Schema: `we"ird`, Table: `it'ems`, Entity: `a\b'c`, IDColumn: `i"d`})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`ON "we""ird"."it'ems" FOR EACH ROW EXECUTE FUNCTION "we""ird"."entity_sync_notify"('entity_sync', E'a\\b''c', 'i"d');`,
		`attrelid = '"we""ird"."it''ems"'::regclass`,
	} {
		if !strings.Contains(s, want) {
			t.Errorf("script lacks %s:\n%s", want, s)
		}
	}
	if _, err := TriggerSQL(Trigger{Table: "items"}); err == nil {
		t.Error("a trigger without an entity type accepted")
	}
	if got := dollarQuote("x $entity_sync$ y"); !strings.HasPrefix(got, "$entity_sync1$") {
		t.Errorf("dollarQuote picked a tag the body holds: %s", got)
	}
}
