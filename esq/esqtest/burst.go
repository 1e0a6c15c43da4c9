package esqtest

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

const (
	burstPublishers  = 10
	burstPerPub      = 1000
	burstSubscribers = 3
)

// publishRetrying publishes until the queue accepts, as an application must
// while its broker is away, backing off between attempts, until deadline.
func publishRetrying(q esq.Queue, entity shared.EntityType, b []byte, deadline time.Time, attempted func(error)) error {
	for {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		err := q.Publish(ctx, entity, b)
		cancel()
		if attempted != nil {
			attempted(err)
		}
		if err == nil {
			return nil
		}
		if errors.Is(err, esq.ErrClosed) || time.Now().After(deadline) {
			return fmt.Errorf("publish on %q: %w", entity, err)
		}
		time.Sleep(10 * time.Millisecond) // retry backoff while the broker is away
	}
}

func (s *suite) burstWithRestart(t *testing.T) {
	const entity shared.EntityType = "burst"
	broker := s.f.Broker
	if broker == nil {
		t.Log("Factory.Broker is nil: the burst runs without a broker restart, and every message must arrive")
	}
	timeout := 6 * s.ft.Timeout
	deadline := time.Now().Add(timeout)

	qs := s.queues(t, burstSubscribers+burstPublishers+1)
	subs, pubs, checker := qs[:burstSubscribers], qs[burstSubscribers:burstSubscribers+burstPublishers], qs[len(qs)-1]
	if s.ft.SingleProcess {
		subs = subs[:1]
	}

	// The loss checker: after each loss callback, it publishes a mark for
	// that subscriber. The mark must arrive, since the callback promised
	// delivery was live again.
	type lossEvent struct{ sub, n int }
	lossEvents := make(chan lossEvent, 1024)
	recs := make([]*recorder, len(subs))
	for i := range subs {
		r := newRecorder(fmt.Sprintf("subscriber %d", i))
		r.lossHook = func(n int) {
			select {
			case lossEvents <- lossEvent{i, n}:
			default: // a mark for an earlier loss of this subscriber is enough
			}
		}
		recs[i] = r
		subscribe(t, subs[i], entity, r)
	}
	var marksPublished sync.Map // "sub-n" -> time published
	checkerDone := make(chan struct{})
	stopChecker := make(chan struct{})
	go func() {
		defer close(checkerDone)
		for {
			select {
			case <-stopChecker:
				return
			case ev := <-lossEvents:
				b := body(entity, fmt.Sprintf("lossmark-%d-%d", ev.sub, ev.n))
				if err := publishRetrying(checker, entity, b, deadline, nil); err != nil {
					t.Errorf("loss mark for subscriber %d: %v", ev.sub, err)
					continue
				}
				marksPublished.Store(string(b), time.Now())
			}
		}
	}()
	defer func() { close(stopChecker); <-checkerDone }()

	all := make([][]byte, 0, burstPublishers*burstPerPub)
	for p := 0; p < burstPublishers; p++ {
		for i := 0; i < burstPerPub; i++ {
			all = append(all, body(entity, fmt.Sprintf("p%d-%d", p, i)))
		}
	}

	var half, triedWhileDown, done sync.WaitGroup
	half.Add(burstPublishers)
	triedWhileDown.Add(burstPublishers)
	done.Add(burstPublishers)
	stopped := make(chan struct{})
	var failures atomic.Int64
	errs := make(chan error, burstPublishers)
	start := time.Now()
	for p := 0; p < burstPublishers; p++ {
		go func() {
			defer done.Done()
			var halfOnce, triedOnce sync.Once
			markHalf := func() { halfOnce.Do(half.Done) }
			markTried := func() { triedOnce.Do(triedWhileDown.Done) }
			defer markTried() // also when giving up early: nobody waits forever
			defer markHalf()
			for i := 0; i < burstPerPub; i++ {
				if i == burstPerPub/2 {
					markHalf()
					if broker != nil {
						<-stopped // publish the second half while the broker is away
					}
				}
				err := publishRetrying(pubs[p], entity, all[p*burstPerPub+i], deadline, func(err error) {
					if err != nil {
						failures.Add(1)
					}
					if i >= burstPerPub/2 {
						markTried()
					}
				})
				if err != nil {
					errs <- fmt.Errorf("publisher %d, message %d: %w", p, i, err)
					return
				}
			}
		}()
	}
	half.Wait()
	if broker != nil {
		t.Logf("%d of %d published; stopping the broker", burstPublishers*burstPerPub/2, len(all))
		stopAt := time.Now()
		if err := broker.Stop(); err != nil {
			close(stopped)
			t.Fatalf("stop the broker: %v", err)
		}
		close(stopped)
		for i, q := range subs {
			awaitLive(t, fmt.Sprintf("subscriber %d", i), q, false, s.ft.Timeout)
		}
		triedWhileDown.Wait()
		if err := broker.Start(); err != nil {
			t.Fatalf("start the broker: %v", err)
		}
		t.Logf("broker down for %s; every publisher tried to publish meanwhile", time.Since(stopAt).Round(time.Millisecond))
	}
	done.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%d messages published by %d publishers in %s (%d failed attempts retried)",
		len(all), burstPublishers, time.Since(start).Round(time.Millisecond), failures.Load())

	// Each subscriber ends with every message, or with a loss callback
	// whose mark arrived.
	for i, r := range recs {
		prefix := fmt.Sprintf(`"lossmark-%d-`, i)
		markArrived := func() bool {
			r.mu.Lock()
			defer r.mu.Unlock()
			for b := range r.got {
				if strings.Contains(b, prefix) {
					return true
				}
			}
			return false
		}
		r.await(t, time.Until(deadline)+s.ft.Timeout, func() (bool, string) {
			n := r.count(all)
			if n == len(all) {
				return true, ""
			}
			r.mu.Lock()
			losses := r.losses
			r.mu.Unlock()
			if losses == 0 {
				return false, fmt.Sprintf("received %d of %d messages and the loss callback was never called: silent loss", n, len(all))
			}
			if markArrived() {
				return true, ""
			}
			return false, fmt.Sprintf("received %d of %d messages; the loss callback was called %d times, but no message published after it arrived: it was called before delivery was live again", n, len(all), losses)
		})
	}
	for i, q := range subs {
		awaitLive(t, fmt.Sprintf("subscriber %d", i), q, true, s.ft.Timeout)
	}
	for i, r := range recs {
		r.mu.Lock()
		losses, total := r.losses, r.total
		r.mu.Unlock()
		t.Logf("subscriber %d: %d of %d messages (%d deliveries), loss callback called %d times", i, r.count(all), len(all), total, losses)
		if broker == nil && losses > 0 {
			t.Logf("subscriber %d reported a loss with no broker restart", i)
		}
		if !s.ft.Duplicates {
			r.mu.Lock()
			for b, n := range r.got {
				if n > 1 && !strings.Contains(b, "lossmark-") {
					t.Errorf("subscriber %d received %s %d times (set Features.Duplicates if the queue may redeliver)", i, b, n)
					break
				}
			}
			r.mu.Unlock()
		}
	}
}
