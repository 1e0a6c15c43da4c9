package esmetrics_test

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esmetrics"
	"github.com/entity-sync/entity-sync/shared"
)

// A server with its metrics on /metrics: Instrument before New, Register
// after.
func Example() {
	cfg := entitysync.Config{} // in-process queue
	m := esmetrics.Instrument(&cfg)
	es, err := entitysync.New(cfg)
	if err != nil {
		panic(err)
	}
	defer es.Close(context.Background())
	reg := prometheus.NewRegistry()
	if err := m.Register(reg, es); err != nil {
		panic(err)
	}
	es.Mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))

	err = es.Register("items", func(context.Context, shared.EntityKey) ([][]byte, error) {
		return [][]byte{[]byte(`{"id":"100"}`)}, nil
	})
	if err != nil {
		panic(err)
	}
	if err := es.NotifyAllOfChange(shared.EntityKey{Entity: "items", ID: "100"}); err != nil {
		panic(err)
	}

	srv := httptest.NewServer(es.Mux)
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		panic(err)
	}
	defer resp.Body.Close()
	lines := bufio.NewScanner(resp.Body)
	for lines.Scan() {
		for _, name := range []string{"entitysync_ready ", "entitysync_notifications_published_total ", "entitysync_notifications_received_total "} {
			if strings.HasPrefix(lines.Text(), name) {
				fmt.Println(lines.Text())
			}
		}
	}
	// Output:
	// entitysync_notifications_published_total 1
	// entitysync_notifications_received_total 1
	// entitysync_ready 1
}
