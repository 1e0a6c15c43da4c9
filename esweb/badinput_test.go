package esweb_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esweb"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

const wait = 10 * time.Second

func TestBadFramesAreIgnoredAndTheConnectionLives(t *testing.T) {
	store := testkit.NewStore()
	passed := make(chan []byte, 16)
	e, srv := testkit.Serve(t, es.Config{WSPassThrough: func(_ string, b []byte) { passed <- b }})
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	bystander := testkit.Dial(t, srv)
	bystander.Subscribe("items", "b")
	bystander.AwaitKeys(wait, shared.EntityKey{Entity: "items", ID: "b"})

	bad := []string{
		`not json`,
		`{"action":`,
		`[1,2,3]`,
		`"just a string"`,
		`{"action":"explode","body":{}}`,
		`{"action":"subscribe","body":"items/1"}`,
		`{"action":"subscribe","body":{"entity":5,"id":true}}`,
		`{"action":"subscribe","body":{"entity":"items"}}`,
		`{"action":"subscribe","body":{"entity":"nobody-registered-this","id":"1"}}`,
		`{"action":"unsubscribe","body":[]}`,
		`{"action":"secret","body":{"not":"a string"}}`,
		`{"action":"subscribe"}`,
		"\x00\xff\xfe",
	}
	ws := testkit.Dial(t, srv)
	for i, frame := range bad {
		ws.SendRaw([]byte(frame))
		// The connection still serves requests after each bad frame.
		id := "after-" + string(rune('a'+i))
		ws.Subscribe("items", id)
		ws.AwaitKeys(wait, shared.EntityKey{Entity: "items", ID: id})
	}
	select {
	case b := <-passed:
		t.Errorf("a malformed frame reached the pass-through: %q", b)
	default:
	}

	// The bystander never noticed.
	v := store.Bump(shared.EntityKey{Entity: "items", ID: "b"})
	if err := e.NotifyAllOfChange(shared.EntityKey{Entity: "items", ID: "b"}); err != nil {
		t.Fatal(err)
	}
	bystander.Await(wait, "bystander's change", testkit.Is("items", "b", v))
}

func TestOversizedFrameClosesOnlyThatConnection(t *testing.T) {
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, es.Config{Web: esweb.Options{ReadLimit: 1024}})
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	bystander := testkit.Dial(t, srv)
	bystander.Subscribe("items", "b")
	bystander.AwaitKeys(wait, shared.EntityKey{Entity: "items", ID: "b"})

	big := testkit.Dial(t, srv)
	big.SendRaw([]byte(`{"action":"secret","body":"` + strings.Repeat("x", 2048) + `"}`))
	select {
	case <-big.Closed:
	case <-time.After(wait):
		t.Fatal("oversized frame did not close the connection")
	}
	var ce *websocket.CloseError
	if !errors.As(big.CloseErr, &ce) || ce.Code != websocket.CloseMessageTooBig {
		t.Errorf("closed with %v, want code 1009", big.CloseErr)
	}

	v := store.Bump(shared.EntityKey{Entity: "items", ID: "b"})
	if err := e.NotifyAllOfChange(shared.EntityKey{Entity: "items", ID: "b"}); err != nil {
		t.Fatal(err)
	}
	bystander.Await(wait, "bystander's change", testkit.Is("items", "b", v))
}

func TestPassThroughPanicDoesNotEndTheServer(t *testing.T) {
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, es.Config{WSPassThrough: func(string, []byte) { panic("app bug") }})
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	ws := testkit.Dial(t, srv)
	ws.SendRaw([]byte(`{"hello":1}`))
	ws.Subscribe("items", "1")
	ws.AwaitKeys(wait, shared.EntityKey{Entity: "items", ID: "1"})
}

func TestPingsKeepAReadingClientAlive(t *testing.T) {
	store := testkit.NewStore()
	// Pings every 100 ms keep a 500 ms read deadline moving, with room for a
	// loaded machine.
	e, srv := testkit.Serve(t, es.Config{Web: esweb.Options{PongWait: 500 * time.Millisecond, HeartbeatInterval: 100 * time.Millisecond}})
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	pings := make(chan struct{}, 16)
	ws := testkit.Dial(t, srv)
	ws.Conn.SetPingHandler(func(data string) error {
		select {
		case pings <- struct{}{}:
		default:
		}
		return ws.Conn.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(time.Second))
	})
	ws.Subscribe("items", "1")
	ws.AwaitKeys(wait, shared.EntityKey{Entity: "items", ID: "1"})
	// Several ping periods pass; the pongs keep the connection open.
	for i := 0; i < 5; i++ {
		select {
		case <-pings:
		case <-time.After(wait):
			t.Fatalf("ping %d not received", i+1)
		}
	}
	v := store.Bump(shared.EntityKey{Entity: "items", ID: "1"})
	if err := e.NotifyAllOfChange(shared.EntityKey{Entity: "items", ID: "1"}); err != nil {
		t.Fatal(err)
	}
	ws.Await(wait, "change after pings", testkit.Is("items", "1", v))
}
