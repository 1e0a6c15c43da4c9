package esbridge_test

import (
	"context"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

// A key notified while its fan-out runs gets its next round as soon as the
// fan-out ends, however its changes compare with its fan-outs: no round
// waits for time to pass. Here 30 subscribers take 100 µs each (a 3 ms
// fan-out) and the key changes every millisecond; the bridge used to
// hold such a key back for half a fan-out after each one, once it had
// measured that its changes came faster than its fan-outs.
//
// The bubble's clock moves only while every goroutine waits, so a round
// that starts at once starts at the very instant the previous one ended.
func TestNotifiedKeyGetsItsNextRoundAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var (
			mu     sync.Mutex
			rounds []esbridge.Round
		)
		log := logrus.New()
		log.SetLevel(logrus.WarnLevel)
		br := esbridge.New(esq.NewMemory(), newFlipFetcher(), esbridge.Options{Logger: log, OnRound: func(r esbridge.Round) {
			mu.Lock()
			rounds = append(rounds, r)
			mu.Unlock()
		}})
		if err := br.ServeEntity(benchEntity); err != nil {
			t.Fatalf("ServeEntity: %v", err)
		}
		key := shared.EntityKey{Entity: benchEntity, ID: "busy"}
		for range 30 {
			c := br.ClientBuilder(context.Background())
			defer c.Close()
			c.SetDirect(func(*esbridge.Update) bool {
				time.Sleep(100 * time.Microsecond) // a slow socket write
				return true
			})
			if err := c.Subscribe(key); err != nil {
				t.Fatalf("Subscribe: %v", err)
			}
		}
		// A fan-out's sleeps count as waiting too: let the clock run
		// past the first round (for the subscribes) before synctest.Wait.
		time.Sleep(time.Second)
		synctest.Wait()
		mu.Lock()
		rounds = rounds[:0]
		mu.Unlock()

		for range 30 {
			if err := br.NotifyAllOfChange(key); err != nil {
				t.Fatalf("NotifyAllOfChange: %v", err)
			}
			time.Sleep(time.Millisecond)
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if err := br.Close(context.Background()); err != nil {
			t.Errorf("Close: %v", err)
		}

		mu.Lock()
		defer mu.Unlock()
		if len(rounds) < 5 {
			t.Fatalf("%d rounds for 30 changes 1 ms apart and 3 ms fan-outs, want several", len(rounds))
		}
		for i := 1; i < len(rounds); i++ {
			if wait := rounds[i].Started.Sub(rounds[i-1].Delivered); wait != 0 && rounds[i].Notified.Before(rounds[i-1].Delivered) {
				t.Errorf("round %d, notified during round %d's fan-out, started %v after that fan-out ended, want at once", i, i-1, wait)
			}
		}
	})
}
