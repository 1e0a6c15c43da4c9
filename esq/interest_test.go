package esq_test

import (
	"encoding/json"
	"strconv"
	"strings"
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

func TestRouteByKey(t *testing.T) {
	one := []byte(`{"entity":"items","id":"a.b*>","_es":{"p":"x","n":1}}`)
	got := esq.RouteByKey("items", one)
	if len(got) != 1 || string(got[0].Body) != string(one) || got[0].Token != esq.RouteToken("a.b*>") {
		t.Errorf("one key: %+v, want the body unchanged on its token", got)
	}
	if tok := esq.RouteToken("a.b*>"); len(tok) != 16 || strings.Trim(tok, "0123456789abcdef") != "" {
		t.Errorf("token %q is not 16 hex digits", tok)
	}
	got = esq.RouteByKey("items", []byte(`{"entity":"items","ids":["a","b","a",""]}`))
	if len(got) != 2 || string(got[0].Body) != `{"entity":"items","id":"a"}` || string(got[1].Body) != `{"entity":"items","id":"b"}` {
		t.Errorf("batch: %+v, want one body per distinct key", got)
	}
	ids := make([]string, esq.MaxRoutedKeys+1)
	for i := range ids {
		ids[i] = strconv.Itoa(i)
	}
	big, _ := json.Marshal(shared.Notification{Entity: "items", IDs: ids})
	for _, b := range [][]byte{big, []byte(`{"_es":{"p":"x","n":2}}`), []byte(`not json`), []byte(`{"entity":"other","id":"a"}`)} {
		if got := esq.RouteByKey("items", b); got != nil {
			t.Errorf("%.40s: routed %+v, want nil (the entity type's own topic)", b, got)
		}
	}
}

// Keys takes a queue by key only when it is an esq.KeyQueue itself: a type
// that embeds one (here *esq.Memory) to do more in Publish or Subscribe
// gets PublishKey and SubscribeKeys promoted, and must not have them used
// in place of its own methods.
func TestKeysOnlyForTheQueueItself(t *testing.T) {
	m := esq.NewMemory()
	if k := esq.Keys(m); k == nil || k.KeyQueue() != esq.Queue(m) {
		t.Errorf("Keys(*Memory) = %v, want the queue itself", k)
	}
	if k := esq.Keys(interestQueue{Memory: m}); k != nil {
		t.Errorf("Keys of a type embedding *Memory = %T, want nil", k)
	}
	if k := esq.Keys(esq.DetectLoss(esq.NewMemory(), nil)); k == nil {
		t.Error("Keys(DetectLoss(*Memory)) is nil: DetectLoss returns the in-process queue unchanged")
	}
}
