package esbridge_test

import (
	"context"
	"runtime"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

// A notification's round starts while the notifying goroutine (with the
// in-process queue, the app's HTTP handler) still runs, not once it blocks:
// on one core, NotifyAllOfChange returns after the worker it woke has
// fetched. Without the bridge yielding, the worker waited in the caller's
// run slot until the caller blocked, and each round started late by
// whatever the caller did next (writing its HTTP response).
func TestNotificationRoundStartsBeforeTheNotifierGoesOn(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	br := esbridge.New(esq.NewMemory(), newFlipFetcher(), esbridge.Options{Logger: log})
	defer br.Close(context.Background())
	if err := br.ServeEntity(benchEntity); err != nil {
		t.Fatalf("ServeEntity: %v", err)
	}
	c := br.ClientBuilder(context.Background())
	defer c.Close()
	got := make(chan struct{}, 100)
	c.SetDirect(func(*esbridge.Update) bool {
		got <- struct{}{}
		return true
	})
	key := shared.EntityKey{Entity: benchEntity, ID: "1"}
	if err := c.Subscribe(key); err != nil {
		t.Fatalf("Subscribe: %v", err)
	}
	<-got // the subscribe's round

	// The scheduler may run the caller first now and then (it checks its
	// global queue every so often, and -race shuffles run slots): most
	// rounds, not all, must have fetched by the time the call returns.
	const changes = 20
	early := 0
	for range changes {
		before := br.Stats().Fetches
		if err := br.NotifyAllOfChange(key); err != nil {
			t.Fatalf("NotifyAllOfChange: %v", err)
		}
		if br.Stats().Fetches > before {
			early++
		}
		<-got // this change's round is over before the next change
	}
	if early < changes*3/4 {
		t.Errorf("%d of %d rounds had fetched when NotifyAllOfChange returned on one core, want nearly all", early, changes)
	}
}

// A key with more subscribers than one core's share of a fan-out is not
// yielded to: its round would keep the notifier (the app's HTTP handler)
// waiting for the whole fan-out, and the round's start matters little next
// to its length. On one core, NotifyAllOfChange returns before the round.
func TestLargeKeyRoundDoesNotHoldTheNotifier(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	notifiedRounds := make(chan struct{}, 16)
	br := esbridge.New(esq.NewMemory(), newFlipFetcher(), esbridge.Options{Logger: log, OnRound: func(r esbridge.Round) {
		if !r.Notified.IsZero() {
			notifiedRounds <- struct{}{}
		}
	}})
	defer br.Close(context.Background())
	if err := br.ServeEntity(benchEntity); err != nil {
		t.Fatalf("ServeEntity: %v", err)
	}
	const subscribers = 200
	key := shared.EntityKey{Entity: benchEntity, ID: "1"}
	for range subscribers {
		c := br.ClientBuilder(context.Background())
		defer c.Close()
		c.SetDirect(func(*esbridge.Update) bool { return true })
		if err := c.Subscribe(key); err != nil {
			t.Fatalf("Subscribe: %v", err)
		}
	}
	// A first change, whose round also waits for the subscribes' ones.
	if err := br.NotifyAllOfChange(key); err != nil {
		t.Fatalf("NotifyAllOfChange: %v", err)
	}
	<-notifiedRounds
	for range 5 {
		before := br.Stats().Fetches
		if err := br.NotifyAllOfChange(key); err != nil {
			t.Fatalf("NotifyAllOfChange: %v", err)
		}
		if br.Stats().Fetches != before {
			t.Fatalf("NotifyAllOfChange of a key with %d subscribers returned after its round had begun, on one core", subscribers)
		}
		<-notifiedRounds
	}
}
