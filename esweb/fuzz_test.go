package esweb

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"net/http"
	"testing"

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
