package redisq_test

import (
	"testing"

	"github.com/entity-sync/entity-sync/esq/esqtest"
	"github.com/entity-sync/entity-sync/esq/redisq"
)

// What routing by key costs against the machine's Redis (Watch waits for
// Redis's subscribe confirmation):
//
//	go test -run - -bench . ./esq/redisq/
func BenchmarkRouting(b *testing.B) {
	requireMachineRedis(b)
	esqtest.BenchRouting(b, func(b *testing.B, route bool) esqtest.RoutingQueue {
		return newQueue(b, redisq.Config{Addr: machineAddr, ChannelPrefix: randomPrefix(b), RouteByKey: route})
	})
}
