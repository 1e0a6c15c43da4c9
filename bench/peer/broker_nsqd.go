//go:build linux

package main

import (
	"github.com/entity-sync/entity-sync/internal/childproc"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
)

// runNSQD is the nsqd role: an nsqd v1.3.0 (the module's, embedded) in a
// process of its own, as a deployment runs one, and as Centrifuge's Redis
// runs: the broker then shares no Go runtime with the orchestrator, whose
// HTTP requests and bookkeeping would otherwise delay it. Its hello's WS
// field is the nsqd's TCP address.
func runNSQD(config) int {
	broker, err := nsqtest.Embed()
	if err != nil {
		sayHello(hello{Err: "nsqd: " + err.Error()})
		return 1
	}
	sayHello(hello{WS: broker.TCPAddr()})
	childproc.WaitForParent(childLifetime)
	broker.Close()
	return 0
}
