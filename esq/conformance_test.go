package esq_test

import (
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esq/esqtest"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// The in-process queue: one instance serves one server, so the suite
// publishes and subscribes on the same one; there is no broker to restart.
func TestMemoryConformance(t *testing.T) {
	esqtest.Run(t, esqtest.Factory{
		NewQueue: func(testing.TB) esq.Queue { return esq.NewMemory() },
	}, esqtest.Features{SingleProcess: true})
}

// The NSQ queue on an embedded nsqd that the suite stops and starts again
// on the same ports in the middle of the burst.
func TestNSQConformance(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	esqtest.Run(t, esqtest.Factory{
		NewQueue: func(t testing.TB) esq.Queue {
			q, err := esq.NewNSQ(esq.NSQConfig{
				NSQDAddrs: []string{nsqd.TCPAddr()},
				// Reconnect fast after the restart, as the convergence tests do.
				ReconnectInterval: 200 * time.Millisecond,
				WatchInterval:     50 * time.Millisecond,
				Logger:            testkit.SilentLogger(),
			})
			if err != nil {
				t.Fatal(err)
			}
			return q
		},
		Broker: esqtest.BrokerFuncs{
			StopFunc:  func() error { nsqd.Stop(); return nil },
			StartFunc: nsqd.Start,
		},
	}, esqtest.Features{
		Duplicates: true,    // NSQ delivers at least once
		MaxPayload: 1 << 20, // nsqd's --max-msg-size default
		InvalidEntities: []shared.EntityType{"", "has space", "star*", "slash/name",
			shared.EntityType(longName(65))},
		BrokerGoroutines: []string{"github.com/nsqio/nsq/", "github.com/nsqio/go-diskqueue", "entity-sync/internal/nsqtest"},
	})
}

func longName(n int) string {
	b := make([]byte, n)
	for i := range b {
		b[i] = 'a'
	}
	return string(b)
}
