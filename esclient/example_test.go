package esclient_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esclient"
	"github.com/entity-sync/entity-sync/shared"
)

// The example runs its own entity-sync server to talk to; in practice the
// server is another process and only the client part is yours.
func Example() {
	// --- server side: one entity type, "items", kept in a map ---
	var mu sync.Mutex
	names := map[string]string{"100": "pen"}
	log := logrus.New()
	log.SetLevel(logrus.ErrorLevel)
	es, _ := entitysync.New(entitysync.Config{Logger: log})
	_ = es.Register("items", func(_ context.Context, k shared.EntityKey) ([][]byte, error) {
		mu.Lock()
		defer mu.Unlock()
		name, ok := names[k.ID]
		if !ok {
			return nil, nil // no rows: the client gets Gone
		}
		row, err := json.Marshal(map[string]string{"id": k.ID, "name": name})
		return [][]byte{row}, err
	})
	srv := httptest.NewServer(es.Mux)
	defer srv.Close()
	defer es.Close(context.Background())

	// --- client side ---
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	url := "ws" + strings.TrimPrefix(srv.URL, "http") + shared.WebsocketPath
	client, err := esclient.Dial(ctx, url, esclient.Options{
		OnState: func(s esclient.State, err error) {
			// Connected, Disconnected (with err), Connecting, ...: the
			// client reconnects and resubscribes on its own.
		},
	})
	if err != nil {
		fmt.Println("dial:", err)
		return
	}
	defer client.Close()

	updates := make(chan string, 10)
	unsubscribe := client.Subscribe(shared.EntityKey{Entity: "items", ID: "100"},
		func(rows []json.RawMessage) { updates <- string(rows[0]) },
		func() { updates <- "gone" },
	)
	defer unsubscribe()
	fmt.Println(<-updates) // the current state, right away

	// The app writes, then notifies; every subscribed client gets the rows.
	mu.Lock()
	names["100"] = "fountain pen"
	mu.Unlock()
	_ = es.NotifyAllOfChange(shared.EntityKey{Entity: "items", ID: "100"})
	fmt.Println(<-updates)

	mu.Lock()
	delete(names, "100")
	mu.Unlock()
	_ = es.NotifyAllOfChange(shared.EntityKey{Entity: "items", ID: "100"})
	fmt.Println(<-updates)

	// Output:
	// {"id":"100","name":"pen"}
	// {"id":"100","name":"fountain pen"}
	// gone
}
