package esq_test

import (
	"testing"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

// interestQueue can route; routes says whether it is configured to.
type interestQueue struct {
	*esq.Memory
	routes bool
}

func (q interestQueue) Routes() bool                 { return q.routes }
func (q interestQueue) Watch(shared.EntityKey) error { return nil }
func (q interestQueue) Unwatch(shared.EntityKey)     {}

// A queue that routes by key is not wrapped for loss detection (a server
// hearing only its keys would take every other key's sequence numbers for
// holes); one that can route but broadcasts is wrapped as any other.
func TestDetectLossLeavesRoutingQueuesAlone(t *testing.T) {
	routing := interestQueue{Memory: esq.NewMemory(), routes: true}
	if got := esq.DetectLoss(routing, nil); got != esq.Queue(routing) {
		t.Errorf("DetectLoss wrapped a routing queue: %T", got)
	}
	if esq.Routing(routing) == nil {
		t.Error("Routing(routing queue) is nil")
	}
	broadcast := interestQueue{Memory: esq.NewMemory()}
	wrapped := esq.DetectLoss(broadcast, nil)
	if wrapped == esq.Queue(broadcast) {
		t.Error("DetectLoss did not wrap a queue that can route but broadcasts")
	}
	if esq.Routing(wrapped) != nil || esq.Routing(broadcast) != nil {
		t.Error("Routing of a broadcasting queue is not nil")
	}
	if esq.Routing(esq.NewMemory()) != nil {
		t.Error("Routing(in-process queue) is not nil")
	}
}
