package esqtest_test

import (
	"testing"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esq/esqtest"
)

// A queue's own test runs the suite: here the in-process queue, whose
// instances do not reach each other (SingleProcess) and which has no broker
// to restart. A networked queue returns one more connection to its broker
// from NewQueue, and sets Factory.Broker if the test can stop and start it.
func ExampleRun() {
	testConformance := func(t *testing.T) {
		esqtest.Run(t, esqtest.Factory{
			NewQueue: func(testing.TB) esq.Queue { return esq.NewMemory() },
		}, esqtest.Features{SingleProcess: true})
	}
	_ = testConformance // func TestConformance(t *testing.T) in a _test.go file
}
