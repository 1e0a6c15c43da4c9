package entitysync_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"strings"
	"sync"

	"github.com/gorilla/websocket"

	"github.com/entity-sync/entity-sync/entitysync"
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
