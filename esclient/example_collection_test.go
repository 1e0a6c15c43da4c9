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
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/shared"
)

// A collection: the server names each row by its "id" field, and the client
// hands the application every state with what changed, row by row. After
// the first state only the changed rows cross the network.
func Example_collection() {
	// --- server side: the todo list of each user, kept in a map ---
	var mu sync.Mutex
	todos := map[string][]string{"ann": {"milk", "bread"}}
	log := logrus.New()
	log.SetLevel(logrus.ErrorLevel)
	es, _ := entitysync.New(entitysync.Config{Logger: log})
	_ = es.RegisterCollection("todos", func(_ context.Context, k shared.EntityKey) ([][]byte, error) {
		mu.Lock()
		defer mu.Unlock()
		var rows [][]byte
		for _, t := range todos[k.ID] {
			row, _ := json.Marshal(map[string]string{"id": t, "user": k.ID})
			rows = append(rows, row)
		}
		return rows, nil
	}, esdb.JSONField("id"))
	srv := httptest.NewServer(es.Mux)
	defer srv.Close()
	defer es.Close(context.Background())

	// --- client side ---
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, err := esclient.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+shared.WebsocketPath, esclient.Options{})
	if err != nil {
		fmt.Println("dial:", err)
		return
	}
	defer client.Close()
	states := make(chan esclient.Snapshot, 10)
	unsubscribe, _ := client.SubscribeWith(shared.EntityKey{Entity: "todos", ID: "ann"},
		esclient.Handlers{Changes: func(s esclient.Snapshot) { states <- s }})
	defer unsubscribe()
	show := func(s esclient.Snapshot) {
		for _, c := range s.Changes {
			fmt.Printf("%s %s; ", c.Type, c.ID)
		}
		fmt.Println(len(s.Rows), "rows")
	}
	show(<-states) // the current state: every row added

	// One write changes two rows; one notification.
	mu.Lock()
	todos["ann"] = []string{"bread", "eggs"}
	mu.Unlock()
	_ = es.NotifyAllOfChange(shared.EntityKey{Entity: "todos", ID: "ann"})
	show(<-states)

	// Output:
	// added milk; added bread; 2 rows
	// removed milk; added eggs; 2 rows
}
