package esbridge_test

import (
	"bytes"
	"context"
	"encoding/json"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/shared"
)

// fixedRows is a fetcher whose every key has the same rows, handed out as
// the very same slice every time (as a cache would).
type fixedRows struct {
	mu   sync.Mutex
	rows [][]byte
}

func (f *fixedRows) Fetch(context.Context, shared.EntityKey, string) ([][]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rows, nil
}

func (f *fixedRows) PerSecret(shared.EntityType) bool { return false }

// Rows that json.Valid accepts may still hold invalid UTF-8 (a Go string
// cut at a byte count, Latin-1 data, SQLite TEXT). Such a row in a text
// frame makes a browser fail the connection, so the bridge repairs every
// run of invalid bytes to U+FFFD before the state is published, logs it
// once per key, and leaves the fetcher's rows alone. The version is the
// repaired rows', so it names what clients get.
func TestInvalidUTF8RowsRepaired(t *testing.T) {
	cut := []byte("{\"name\":\"caf\xc3\"}")
	latin1 := []byte("{\"city\":\"K\xf6ln\",\"n\":1}")
	plain := []byte("\xff\xfe not json")
	good := []byte(`{"name":"café"}`)
	f := &fixedRows{rows: [][]byte{cut, good, latin1, plain}}
	want := [][]byte{
		[]byte(`{"name":"caf` + "\uFFFD" + `"}`),
		good,
		[]byte(`{"city":"K` + "\uFFFD" + `ln","n":1}`),
		[]byte("\uFFFD not json"),
	}
	log, hook := logtest.NewNullLogger()
	rounds := make(chan esbridge.Round, 16)
	b := newUnitBridge(t, f, esbridge.Options{Logger: log, OnRound: func(r esbridge.Round) { rounds <- r }})
	c := b.ClientBuilder(nil)
	if err := c.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	u := nextOne(t, c, k1)
	if len(u.Rows) != len(want) {
		t.Fatalf("got %d rows, want %d", len(u.Rows), len(want))
	}
	for i, r := range u.Rows {
		if !utf8.Valid(r) || !bytes.Equal(r, want[i]) {
			t.Errorf("row %d: got %q, want %q", i, r, want[i])
		}
	}
	for i, r := range [][]byte{cut, latin1} {
		if !json.Valid(want[i*2]) {
			t.Errorf("repaired row %q (from %q) is not valid JSON", want[i*2], r)
		}
	}
	if u.Version() != shared.Version(want) {
		t.Errorf("version %s, want the repaired rows' %s", u.Version(), shared.Version(want))
	}
	if !bytes.Equal(f.rows[0], cut) || !bytes.Equal(f.rows[2], latin1) || !bytes.Equal(f.rows[3], plain) {
		t.Errorf("the fetcher's rows were changed: %q", f.rows)
	}

	// The same rows again are the same state: nothing is published, and
	// the repair is not logged again.
	awaitRound := func() esbridge.Round {
		t.Helper()
		select {
		case r := <-rounds:
			return r
		case <-time.After(unitWait):
			t.Fatal("no round")
			return esbridge.Round{}
		}
	}
	awaitRound()
	for range 3 {
		if err := b.NotifyAllOfChange(k1); err != nil {
			t.Fatal(err)
		}
		if r := awaitRound(); r.Deliveries != 0 {
			t.Fatalf("the same fetched rows were delivered again (%d deliveries)", r.Deliveries)
		}
	}
	var warned int
	for _, e := range hook.AllEntries() {
		if e.Level == logrus.WarnLevel {
			warned++
			if e.Data["key"] != k1.String() || e.Data["rows"] != 3 || e.Data["first"] != 0 {
				t.Errorf("log fields %v, want key %s, 3 rows, first 0", e.Data, k1)
			}
		}
	}
	if warned != 1 {
		t.Errorf("the repair was logged %d times over 4 fetches of one key, want once", warned)
	}
}

// A filter that cuts a string at a byte count (as for a restricted client)
// cannot put invalid UTF-8 on the wire either.
func TestInvalidUTF8FromFilterRepaired(t *testing.T) {
	f := &fixedRows{rows: [][]byte{[]byte(`{"name":"café au lait"}`)}}
	b := newUnitBridge(t, f, esbridge.Options{
		Filter: func(_ context.Context, _ shared.EntityKey, rows [][]byte) [][]byte {
			rows[0] = append([]byte(nil), rows[0][:len(`{"name":"caf`)+1]...) // half of é
			rows[0] = append(rows[0], `"}`...)
			return rows
		},
	})
	c := b.ClientBuilder(nil)
	if err := c.Subscribe(k1); err != nil {
		t.Fatal(err)
	}
	if got, want := row(nextOne(t, c, k1)), `{"name":"caf`+"\uFFFD"+`"}`; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}
