package esweb

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

var fuzzSeeds = []string{
	`{"action":"subscribe","body":{"entity":"items","id":"100"}}`,
	`{"action":"subscribe","ref":"1","body":{"entity":"items","id":"100"}}`,
	`{"action":"unsubscribe","body":{"entity":"items","id":"100"}}`,
	`{"action":"secret","body":"s3cret"}`,
	`{"hello":"pass-through"}`,
	`{"action":"subscribe","body":{"entity":"items","id":""}}`,
	`{"action":"subscribe","body":"items/1"}`,
	`{"action":"explode"}`,
	`{"action":"secret","body":{"x":1}}`,
	`[1,2]`,
	`not json`,
	`{"action":"subscribe","body":{"entity":"it\u0000ems","id":"1"}}`,
}

// FuzzParseRequest checks the frame decoder: any input yields a request or
// a typed error, never a panic, and an accepted subscription key is always
// valid.
func FuzzParseRequest(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := parseRequest(data, shared.MaxIDLength)
		if err != nil {
			if err.code == "" || err.msg == "" {
				t.Fatalf("untyped error %+v", err)
			}
			return
		}
		switch req.action {
		case shared.ActionSubscribe, shared.ActionUnsubscribe:
			if verr := req.key.Validate(); verr != nil {
				t.Fatalf("accepted invalid key %+v: %v", req.key, verr)
			}
		case shared.ActionSecret, "":
		default:
			t.Fatalf("accepted unknown action %q", req.action)
		}
	})
}

// FuzzHandle drives the whole request path (decode, limits, bridge
// subscribe/unsubscribe/secret, pass-through, control frames) with arbitrary
// frames on a real bridge, and checks the connection's invariants.
func FuzzHandle(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	logger := logrus.New()
	logger.SetLevel(logrus.PanicLevel)
	hub := esdb.NewDatabaseHub()
	if err := hub.Register("items", func(_ context.Context, k shared.EntityKey) ([][]byte, error) {
		return [][]byte{[]byte(`{"id":` + string(mustJSON(k.ID)) + `}`)}, nil
	}); err != nil {
		f.Fatal(err)
	}
	bridge := esbridge.New(esq.NewMemory(), hub, esbridge.Options{Logger: logger})
	if err := bridge.ServeEntity("items"); err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = bridge.Close(context.Background()) })
	s := NewServer(bridge.ClientBuilder, Options{Logger: logger, MaxSubscriptions: 3, PassThrough: func(context.Context, []byte) {}})

	f.Fuzz(func(t *testing.T, data []byte) {
		// No socket: the direct writer collects what the connection writes.
		var written []byte
		c := &conn{s: s, envelope: true,
			info: shared.NewConnection("fuzz", &http.Request{RemoteAddr: "fuzz"}, nil, nil)}
		c.direct = func(b []byte) (int, error) { written = append(written, b...); return len(b), nil }
		c.hctx.Context = context.Background()
		c.ctx = &c.hctx
		defer c.hctx.end()
		c.client = bridge.ClientBuilder(c.ctx)
		defer c.client.Close()
		for i := 0; i < 5; i++ { // repeated, so limits and re-subscribes are exercised
			c.handle(data)
		}
		if n := c.client.Subscriptions(); n > s.opts.MaxSubscriptions {
			t.Fatalf("%d subscriptions, limit %d", n, s.opts.MaxSubscriptions)
		}
		for len(written) > 0 {
			var payload []byte
			payload, written = nextTextFrame(t, written)
			var frame map[string]any
			if err := json.Unmarshal(payload, &frame); err != nil || frame["type"] == nil {
				t.Fatalf("control frame is not a typed JSON object: %v", err)
			}
		}
	})
}

// nextTextFrame splits the first server frame off b: it must be a final,
// unmasked text frame.
func nextTextFrame(t *testing.T, b []byte) (payload, rest []byte) {
	t.Helper()
	if len(b) < 2 || b[0] != 0x81 || b[1]&0x80 != 0 {
		t.Fatalf("not a final unmasked text frame: % x", b[:min(len(b), 10)])
	}
	n, h := int(b[1]), 2
	switch n {
	case 126:
		n, h = int(binary.BigEndian.Uint16(b[2:])), 4
	case 127:
		n, h = int(binary.BigEndian.Uint64(b[2:])), 10
	}
	if len(b) < h+n {
		t.Fatalf("frame of %d bytes cut short at %d", n, len(b)-h)
	}
	return b[h : h+n], b[h+n:]
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

// FuzzEncodeState checks the frames of a state whose rows are arbitrary
// bytes, as a fetch function may return them, on their way through a real
// bridge: every envelope frame is valid UTF-8 and valid JSON, and every raw
// frame valid UTF-8 (browsers fail a connection on a text frame that is
// not). Rows are the input's lines.
func FuzzEncodeState(f *testing.F) {
	for _, s := range []string{
		`{"id":"a", "n": 2}`,
		"{\"name\":\"caf\xc3\"}\n{\"s\":\"<&>\"}",
		"{\"u\":\"\u2028\u2029\"}\nnot json\n",
		"\xff\xfe\x00\n[1,2,3]\n\"x\"\n",
		"",
		"{\"bad\":\"\\ud800\"}\n{\"k\":\"\x80\"} \n null",
		// Frames with 2-, 4- and 10-byte headers.
		strings.Repeat("x", 100),
		`"` + strings.Repeat("y", 300) + `"`,
		`"` + strings.Repeat("z", 70000) + `"`,
	} {
		f.Add([]byte(s))
	}
	logger := logrus.New()
	logger.SetLevel(logrus.PanicLevel)
	var (
		mu   sync.Mutex
		rows [][]byte
	)
	hub := esdb.NewDatabaseHub()
	if err := hub.Register("items", func(context.Context, shared.EntityKey) ([][]byte, error) {
		mu.Lock()
		defer mu.Unlock()
		return rows, nil
	}); err != nil {
		f.Fatal(err)
	}
	bridge := esbridge.New(esq.NewMemory(), hub, esbridge.Options{Logger: logger})
	if err := bridge.ServeEntity("items"); err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = bridge.Close(context.Background()) })
	var n atomic.Int64

	f.Fuzz(func(t *testing.T, data []byte) {
		mu.Lock()
		rows = nil
		if len(data) > 0 {
			rows = bytes.Split(data, []byte("\n"))
		}
		mu.Unlock()
		// A new key each time: the bridge fetches it afresh.
		key := shared.EntityKey{Entity: "items", ID: strconv.FormatInt(n.Add(1), 10)}
		c := bridge.ClientBuilder(context.Background())
		defer c.Close()
		if err := c.Subscribe(key); err != nil {
			t.Fatal(err)
		}
		var u *esbridge.Update
		for u == nil {
			if batch := c.Take(nil); len(batch) > 0 {
				u = batch[0]
				break
			}
			select {
			case <-c.Ready():
			case <-time.After(10 * time.Second):
				t.Fatal("no state within 10s")
			}
		}
		payload, rest := nextTextFrame(t, prepareEnvelope(u).([]byte))
		if len(rest) != 0 {
			t.Fatalf("%d bytes after the envelope frame", len(rest))
		}
		if !utf8.Valid(payload) || !json.Valid(payload) {
			t.Fatalf("envelope frame is not valid UTF-8 JSON: %q", payload)
		}
		var frame struct {
			Type    string            `json:"type"`
			Version string            `json:"version"`
			Rows    []json.RawMessage `json:"rows"`
		}
		if err := json.Unmarshal(payload, &frame); err != nil {
			t.Fatal(err)
		}
		if len(frame.Rows) != len(u.Rows) || frame.Version != u.Version() {
			t.Fatalf("frame %s for %d rows of version %s", payload, len(u.Rows), u.Version())
		}
		// Each row as fetched (repaired): JSON byte for byte (the decoder
		// leaves out the JSON whitespace around it), anything else as a
		// string of its bytes.
		for i, row := range u.Rows {
			if json.Valid(row) {
				if !bytes.Equal(frame.Rows[i], bytes.TrimSpace(row)) || !bytes.Contains(payload, row) {
					t.Fatalf("row %q arrived as %q", row, frame.Rows[i])
				}
				continue
			}
			var s string
			if err := json.Unmarshal(frame.Rows[i], &s); err != nil || s != string(row) {
				t.Fatalf("row %q arrived as %q, want a JSON string of it", row, frame.Rows[i])
			}
		}
		raw := prepareRaw(u).([]byte)
		for i := range u.Rows {
			payload, raw = nextTextFrame(t, raw)
			if !utf8.Valid(payload) {
				t.Fatalf("raw frame %d is not valid UTF-8: %q", i, payload)
			}
		}
		if len(raw) != 0 {
			t.Fatalf("%d bytes after the raw frames", len(raw))
		}
	})
}

// FuzzAppendString checks the JSON string encoder of the state frames: its
// output is valid UTF-8 JSON and decodes to what encoding/json makes of the
// same string (each invalid UTF-8 byte as U+FFFD).
func FuzzAppendString(f *testing.F) {
	for _, s := range []string{"", "items", "a\"b\\c", "\x00\x1f\n\t\r\x7f", "caf\xc3", "<&>\u2028", "\xff\xfe\xed\xa0\x80", "日本"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		b := appendString([]byte("x"), s)[1:]
		if !utf8.Valid(b) || !json.Valid(b) {
			t.Fatalf("%q encoded as %q: not valid UTF-8 JSON", s, b)
		}
		var got, want string
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(mustJSON(s), &want); err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Fatalf("%q encoded as %q, decodes to %q; encoding/json gives %q", s, b, got, want)
		}
	})
}
