package pgq_test

import (
	"context"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esq/esqtest"
	"github.com/entity-sync/entity-sync/esq/pgq"
	"github.com/entity-sync/entity-sync/internal/pgtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// The conformance suite, through a proxy that the suite stops (every
// connection dropped, connecting refused) and starts again mid-burst: what
// a Postgres restart looks like to the queue, without stopping the
// machine's server under the other tests. Every instance is one more
// server on one channel of its own.
func TestConformance(t *testing.T) {
	proxy := pgtest.StartProxy(t)
	ch := pgtest.Name(t, "es_chan_")
	esqtest.Run(t, esqtest.Factory{
		NewQueue: func(t testing.TB) esq.Queue {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			q, err := pgq.New(ctx, pgq.Config{
				ConnString:        proxy.DSN(),
				Channel:           ch,
				Logger:            testkit.SilentLogger(),
				MinReconnectDelay: 20 * time.Millisecond,
				MaxReconnectDelay: 200 * time.Millisecond,
			})
			if err != nil {
				t.Fatal(err)
			}
			return q
		},
		Broker: esqtest.BrokerFuncs{
			StopFunc:  func() error { proxy.Stop(); return nil },
			StartFunc: proxy.Start,
		},
	}, esqtest.Features{
		MaxPayload:       pgq.MaxPayload, // the suite's bodies are keys: sent as they are
		InvalidEntities:  []shared.EntityType{"", "\xff"},
		BrokerGoroutines: []string{"entity-sync/internal/pgtest"},
	})
}
