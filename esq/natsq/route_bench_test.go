package natsq_test

import (
	"testing"

	"github.com/entity-sync/entity-sync/esq/esqtest"
	"github.com/entity-sync/entity-sync/esq/natsq"
)

// What routing by key costs against the machine's NATS (Watch waits for a
// flush round trip):
//
//	go test -run - -bench . ./esq/natsq/
func BenchmarkRouting(b *testing.B) {
	requireMachineNATS(b)
	esqtest.BenchRouting(b, func(b *testing.B, route bool) esqtest.RoutingQueue {
		return newQueue(b, natsq.Config{URL: machineURL, SubjectPrefix: randomPrefix(b), RouteByKey: route})
	})
}
