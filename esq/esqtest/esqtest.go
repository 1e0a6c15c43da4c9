// Package esqtest is the conformance suite for esq.Queue implementations:
// one set of tests, run against a real broker, that proves a queue gives the
// bridge the promises it relies on. Every queue in this module passes it (the
// in-process queue, NSQ, NATS, Redis), and a third party checks its own queue
// the same way, from a test in its own module:
//
//	func TestConformance(t *testing.T) {
//		esqtest.Run(t, esqtest.Factory{
//			NewQueue: func(t testing.TB) esq.Queue {
//				q, err := myqueue.New(myqueue.Config{Addr: addr, Prefix: prefix})
//				if err != nil {
//					t.Fatal(err)
//				}
//				return q
//			},
//			Broker: myBroker, // optional: lets the suite stop and start the broker
//		}, esqtest.Features{MaxPayload: 1 << 20, InvalidEntities: []shared.EntityType{"", "a b"}})
//	}
//
// What the suite checks, one subtest each:
//
//   - Broadcast: every instance that subscribes to an entity type receives
//     every message published on it, by any instance including itself. A
//     queue whose instances share a consumer group or channel load-balances
//     and fails here.
//   - TopicIsolation: a subscriber receives only its own entity type's
//     messages, even from types whose names share a prefix with it.
//   - LiveOnReturn: a message published at once after Subscribe returns, by
//     another instance or the same one, is received.
//   - SubscribeTwice: a second Subscribe to the same entity type on one
//     instance returns esq.ErrAlreadySubscribed.
//   - Concurrent: Subscribe and Publish called from many goroutines at once
//     on several instances (run it with -race).
//   - InvalidEntities: the entity types Features.InvalidEntities lists are
//     refused by Publish and Subscribe with an error, and the queue works
//     afterwards.
//   - Oversized: a body one byte over Features.MaxPayload is refused with an
//     error naming the limit; a body of exactly MaxPayload is delivered.
//   - PublishAfterClose: Publish and Subscribe on a closed queue return
//     esq.ErrClosed; a second Close returns.
//   - Close: once Close returns, no callback runs and none of the queue's
//     goroutines is left.
//   - BurstWithRestart: 10 publishers, each on its own instance, publish
//     10,000 messages to 3 subscribing instances; with Factory.Broker set,
//     the broker is stopped once half are published and started again after
//     every publisher has tried to publish while it was down. Each
//     subscriber must end with every message, or have had its loss callback
//     called once delivery was live again: a message published at once
//     after the callback must arrive. A subscriber missing messages with no
//     loss callback is a silent loss and fails the test.
//
// A queue that implements esq.LiveReporter is also held to it: Live
// returns nil right after Subscribe returns, an error wrapping esq.ErrClosed
// after Close, and, in BurstWithRestart, an error on every subscriber within
// Features.Timeout of the broker stopping and nil again once delivery is
// back.
//
// Instances must be independent: each Factory.NewQueue call gives what one
// more server process would make, with its own connections, on the same
// broker and with the same naming (prefix) as the others. The suite closes
// every queue it creates.
package esqtest

import (
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

// Factory gives the suite the queues under test and, optionally, control of
// their broker.
type Factory struct {
	// NewQueue returns a new, unused queue instance connected to the broker
	// under test, as one more server process would make it. It fails t on
	// error. The suite closes every queue it gets; NewQueue may register
	// further cleanup with t.Cleanup.
	NewQueue func(t testing.TB) esq.Queue
	// Broker, if not nil, lets the BurstWithRestart subtest stop and start
	// the broker in the middle of the burst. Without it the burst runs with
	// no restart and every message must arrive.
	Broker Broker
}

// Broker is a broker the suite may stop and start again. Both are called
// from the test goroutine, never concurrently.
type Broker interface {
	// Stop stops the broker (as a crash or a restart would: connections
	// drop, whatever it holds in memory is gone) and returns once it no
	// longer serves.
	Stop() error
	// Start starts the stopped broker again at the same address and
	// returns once it accepts connections.
	Start() error
}

// BrokerFuncs adapts two functions to Broker.
type BrokerFuncs struct {
	// StopFunc implements Broker.Stop.
	StopFunc func() error
	// StartFunc implements Broker.Start.
	StartFunc func() error
}

// Stop calls StopFunc.
func (b BrokerFuncs) Stop() error { return b.StopFunc() }

// Start calls StartFunc.
func (b BrokerFuncs) Start() error { return b.StartFunc() }

// Features says what the queue under test does not promise, and its limits.
// The zero value describes a networked, at-most-once queue with no limits on
// names or sizes.
type Features struct {
	// SingleProcess is set for a queue whose instances do not reach one
	// another, such as an in-process queue: the suite then publishes and
	// subscribes on one instance, with one subscriber per entity type.
	SingleProcess bool
	// Duplicates is set for a queue that may deliver a message more than
	// once (an at-least-once broker such as NSQ). Otherwise a message
	// received twice fails the test.
	Duplicates bool
	// MaxPayload is the largest body Publish accepts, in bytes. A body one
	// byte longer must be refused with an error whose text contains the
	// limit (e.g. "1048576"). Zero: the queue has no limit; the Oversized
	// subtest is skipped.
	MaxPayload int
	// InvalidEntities are entity types that Publish and Subscribe must
	// refuse with an error (names the broker cannot carry, or that would
	// subscribe to more than one type, such as wildcards). Empty: the queue
	// takes every name; the InvalidEntities subtest is skipped.
	InvalidEntities []shared.EntityType
	// BrokerGoroutines are substrings of the stacks of goroutines that
	// belong to a broker embedded in the test process (e.g.
	// "github.com/nats-io/nats-server/v2/"). The Close subtest does not
	// count them as the queue's.
	BrokerGoroutines []string
	// Timeout bounds each wait for a delivery. Default 10s; the burst waits
	// six times as long.
	Timeout time.Duration
}

// newSuite checks factory and fills in features' defaults.
func newSuite(t *testing.T, factory Factory, features Features) *suite {
	t.Helper()
	if factory.NewQueue == nil {
		t.Fatal("esqtest: Factory.NewQueue is nil")
	}
	if features.Timeout <= 0 {
		features.Timeout = 10 * time.Second
	}
	return &suite{f: factory, ft: features}
}

// Run runs the whole suite as subtests of t. The subtests run one after the
// other and use entity types whose names start with their own (e.g.
// "bcast", "iso_items"), so the queues' prefix keeps parallel runs apart.
func Run(t *testing.T, factory Factory, features Features) {
	t.Helper()
	s := newSuite(t, factory, features)
	t.Run("Broadcast", s.broadcast)
	t.Run("TopicIsolation", s.topicIsolation)
	t.Run("LiveOnReturn", s.liveOnReturn)
	t.Run("SubscribeTwice", s.subscribeTwice)
	t.Run("Concurrent", s.concurrent)
	t.Run("InvalidEntities", s.invalidEntities)
	t.Run("Oversized", s.oversized)
	t.Run("PublishAfterClose", s.publishAfterClose)
	t.Run("Close", s.close)
	t.Run("BurstWithRestart", s.burstWithRestart)
}
