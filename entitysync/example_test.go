package entitysync_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"net/http/httptest"
	"strings"
	"sync"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/shared"
)

// A single server on the in-process queue: register how to fetch an entity,
// let a websocket client subscribe, change the entity and notify.
func Example() {
	var mu sync.Mutex
	prices := map[string]int{"100": 5}

	es, err := entitysync.New(entitysync.Config{}) // no NSQ address: in-process queue
	if err != nil {
		fmt.Println(err)
		return
	}
	defer es.Close(context.Background())
	err = es.Register("items", func(_ context.Context, key shared.EntityKey) ([][]byte, error) {
		mu.Lock()
		defer mu.Unlock()
		price, ok := prices[key.ID]
		if !ok {
			return nil, nil // gone
		}
		row, err := json.Marshal(map[string]any{"id": key.ID, "price": price})
		return [][]byte{row}, err
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	srv := httptest.NewServer(es.Mux)
	defer srv.Close()

	// A client (any language) subscribes over the websocket.
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http")+"/ws/entity-sync/", nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer ws.Close()
	_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"action":"subscribe","body":{"entity":"items","id":"100"}}`))
	_, initial, _ := ws.ReadMessage()
	fmt.Println("initial:", string(initial))

	// The app writes, then notifies.
	mu.Lock()
	prices["100"] = 7
	mu.Unlock()
	if err := es.NotifyAllOfChange(shared.EntityKey{Entity: "items", ID: "100"}); err != nil {
		fmt.Println(err)
		return
	}
	_, changed, _ := ws.ReadMessage()
	fmt.Println("changed:", string(changed))
	// Output:
	// initial: {"id":"100","price":5}
	// changed: {"id":"100","price":7}
}

// On a hot write path, NotifyAsync queues the notification and returns at
// once; a background publisher sends it, retrying failures. Before shutting
// down, FlushNotifications (or Close) publishes what is still waiting.
func ExampleEntitySync_NotifyAsync() {
	es, err := entitysync.New(entitysync.Config{Bridge: esbridge.Options{
		OnNotifyError: func(key shared.EntityKey, err error) {
			log.Printf("notify %s failed, retrying: %v", key, err) // or a metric
		},
	}})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer es.Close(context.Background())

	for id := 1; id <= 3; id++ {
		// ... write row id ...
		if err := es.NotifyAsync(shared.EntityKey{Entity: "items", ID: fmt.Sprint(id)}); err != nil {
			fmt.Println(err) // ErrNotifyBacklog: the broker is down or slow
		}
	}
	if err := es.Bridge.FlushNotifications(context.Background()); err != nil {
		fmt.Println(err)
	}
	fmt.Println("published:", es.Bridge.Stats().Notifications)
	// Output:
	// published: 3
}

// A collection: each row of a key is named by its "id" field. An envelope
// client gets the first state in full, with the rows' ids, then only what
// changed. A write that touches several keys notifies them in one call.
func ExampleEntitySync_RegisterCollection() {
	var mu sync.Mutex
	lists := map[string][]string{"ann": {"milk", "bread", "eggs"}, "bob": {"tea"}}
	es, err := entitysync.New(entitysync.Config{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer es.Close(context.Background())
	err = es.RegisterCollection("todos", func(_ context.Context, key shared.EntityKey) ([][]byte, error) {
		mu.Lock()
		defer mu.Unlock()
		var rows [][]byte
		for _, t := range lists[key.ID] {
			rows = append(rows, []byte(`{"id":"`+t+`","note":"buy before Friday, from the shop on the corner"}`))
		}
		return rows, nil
	}, esdb.JSONField("id"))
	if err != nil {
		fmt.Println(err)
		return
	}
	srv := httptest.NewServer(es.Mux)
	defer srv.Close()

	d := websocket.Dialer{Subprotocols: []string{shared.Subprotocol}} // the envelope protocol
	ws, _, err := d.Dial("ws"+strings.TrimPrefix(srv.URL, "http")+shared.WebsocketPath, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer ws.Close()
	show := func() {
		var f struct {
			Type   string
			IDs    []string
			Upsert []struct{ ID string }
			Remove []string
		}
		_ = ws.ReadJSON(&f)
		fmt.Println(f.Type, f.IDs, f.Upsert, f.Remove)
	}
	show() // welcome
	_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"action":"subscribe","body":{"entity":"todos","id":"ann"}}`))
	show()

	// One write moves "bread" from ann's list to bob's: one call for both.
	mu.Lock()
	lists["ann"], lists["bob"] = []string{"milk", "eggs"}, []string{"tea", "bread"}
	mu.Unlock()
	if err := es.NotifyKeys(shared.EntityKey{Entity: "todos", ID: "ann"}, shared.EntityKey{Entity: "todos", ID: "bob"}); err != nil {
		fmt.Println(err)
		return
	}
	show()
	// Output:
	// welcome [] [] []
	// rows [milk bread eggs] [] []
	// diff [] [] [bread]
}
