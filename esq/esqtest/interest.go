package esqtest

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

// RunInterest runs, as subtests of t, the checks of a queue that routes by
// key (esq.Interest, with Routes true): every queue factory.NewQueue makes
// must route. Run covers the rest of the Queue contract for the same queue
// configured to broadcast.
//
//   - WatchedOnly: a subscriber receives the keys it watches and not the
//     others.
//   - LiveOnWatchReturn: a message published from another instance at once
//     after Watch returns is received.
//   - UnwatchStops: after the last Unwatch of a key, its messages no longer
//     arrive (checked once a later Watch on the same instance returned,
//     which the broker handles after the unwatch); a key watched twice and
//     unwatched once still arrives.
//   - Batches: a body naming several keys reaches a subscriber watching any
//     one of them with that key named; one naming more than
//     esq.MaxRoutedKeys, and a body naming no key, reach every subscriber.
//   - PublishKey (for an esq.KeyQueue, see esq.Keys): a key published
//     with PublishKey reaches a subscriber watching it as esq.KeyBody,
//     what Publish of that body would send, and not one watching another
//     key.
//   - CloseWatching: once Close returns on an instance watching keys, no
//     callback runs and none of its goroutines is left.
//   - WatchAfterRestart (with Factory.Broker): once the broker came back
//     and onLoss was called, the messages of every watched key (200 of
//     them) arrive again.
func RunInterest(t *testing.T, factory Factory, features Features) {
	t.Helper()
	s := newSuite(t, factory, features)
	t.Run("WatchedOnly", s.watchedOnly)
	t.Run("LiveOnWatchReturn", s.liveOnWatchReturn)
	t.Run("UnwatchStops", s.unwatchStops)
	t.Run("Batches", s.batches)
	t.Run("PublishKey", s.publishKey)
	t.Run("CloseWatching", s.closeWatching)
	if factory.Broker != nil {
		t.Run("WatchAfterRestart", s.watchAfterRestart)
	}
}

// routing returns q's Interest, failing t if q does not route.
func routing(t testing.TB, q esq.Queue) esq.Interest {
	t.Helper()
	i := esq.Routing(q)
	if i == nil {
		t.Fatalf("esqtest: %T does not route by key (esq.Routing is nil)", q)
	}
	return i
}

func watch(t testing.TB, q esq.Queue, key shared.EntityKey) {
	t.Helper()
	if err := routing(t, q).Watch(key); err != nil {
		t.Fatalf("Watch(%s): %v", key, err)
	}
}

// routedPair returns a subscribing instance with r subscribed to entity,
// and a publishing instance.
func (s *suite) routedPair(t *testing.T, entity shared.EntityType, r *recorder) (sub, pub esq.Queue) {
	qs := s.queues(t, 2)
	sub, pub = qs[0], qs[1]
	routing(t, sub)
	routing(t, pub)
	subscribe(t, sub, entity, r)
	return sub, pub
}

// namedIDs returns how often each id was named by the bodies r received.
func (r *recorder) namedIDs() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	ids := make(map[string]int)
	for b, n := range r.got {
		var m shared.Notification
		if json.Unmarshal([]byte(b), &m) != nil {
			continue
		}
		if m.ID != "" {
			ids[m.ID] += n
		}
		for _, id := range m.IDs {
			ids[id] += n
		}
	}
	return ids
}

func (r *recorder) awaitID(t testing.TB, timeout time.Duration, id string, times int) {
	t.Helper()
	r.await(t, timeout, func() (bool, string) {
		if n := r.namedIDs()[id]; n < times {
			return false, fmt.Sprintf("key %q received %d times, want %d", id, n, times)
		}
		return true, ""
	})
}

func (s *suite) watchedOnly(t *testing.T) {
	const entity shared.EntityType = "rt_only"
	r := newRecorder("subscriber")
	sub, pub := s.routedPair(t, entity, r)
	watch(t, sub, shared.EntityKey{Entity: entity, ID: "watched"})
	for i := 0; i < 20; i++ {
		publish(t, pub, entity, body(entity, "other-"+strconv.Itoa(i)))
	}
	publish(t, pub, entity, body(entity, "watched"))
	r.awaitID(t, s.ft.Timeout, "watched", 1)
	// A second round trip, so that anything sent before has arrived.
	watch(t, sub, shared.EntityKey{Entity: entity, ID: "last"})
	publish(t, pub, entity, body(entity, "last"))
	r.awaitID(t, s.ft.Timeout, "last", 1)
	for id := range r.namedIDs() {
		if id != "watched" && id != "last" {
			t.Errorf("received key %q, which the subscriber does not watch", id)
		}
	}
}

func (s *suite) liveOnWatchReturn(t *testing.T) {
	const entity shared.EntityType = "rt_live"
	r := newRecorder("subscriber")
	sub, pub := s.routedPair(t, entity, r)
	for i := 0; i < 50; i++ {
		id := "k" + strconv.Itoa(i)
		watch(t, sub, shared.EntityKey{Entity: entity, ID: id})
		publish(t, pub, entity, body(entity, id))
	}
	for i := 0; i < 50; i++ {
		r.awaitID(t, s.ft.Timeout, "k"+strconv.Itoa(i), 1)
	}
}

func (s *suite) unwatchStops(t *testing.T) {
	const entity shared.EntityType = "rt_unwatch"
	r := newRecorder("subscriber")
	sub, pub := s.routedPair(t, entity, r)
	in := routing(t, sub)
	gone := shared.EntityKey{Entity: entity, ID: "gone"}
	twice := shared.EntityKey{Entity: entity, ID: "twice"}
	watch(t, sub, gone)
	watch(t, sub, twice)
	watch(t, sub, twice)
	publish(t, pub, entity, body(entity, "gone"))
	r.awaitID(t, s.ft.Timeout, "gone", 1)
	in.Unwatch(gone)
	in.Unwatch(twice)
	watch(t, sub, shared.EntityKey{Entity: entity, ID: "sentinel"})
	publish(t, pub, entity, body(entity, "gone"))
	publish(t, pub, entity, body(entity, "twice"))
	publish(t, pub, entity, body(entity, "sentinel"))
	r.awaitID(t, s.ft.Timeout, "sentinel", 1)
	r.awaitID(t, s.ft.Timeout, "twice", 1)
	if n := r.namedIDs()["gone"]; n != 1 {
		t.Errorf("key received %d times, want once: its message after Unwatch arrived", n)
	}
}

func (s *suite) batches(t *testing.T) {
	const entity shared.EntityType = "rt_batch"
	r := newRecorder("subscriber watching b")
	sub, pub := s.routedPair(t, entity, r)
	idle := newRecorder("subscriber watching nothing")
	subscribe(t, s.queue(t), entity, idle)
	watch(t, sub, shared.EntityKey{Entity: entity, ID: "b"})
	small, _ := json.Marshal(shared.Notification{Entity: entity, IDs: []string{"a", "b", "c"}})
	publish(t, pub, entity, small)
	r.awaitID(t, s.ft.Timeout, "b", 1)
	var ids []string
	for i := 0; i <= esq.MaxRoutedKeys; i++ {
		ids = append(ids, "big-"+strconv.Itoa(i))
	}
	big, _ := json.Marshal(shared.Notification{Entity: entity, IDs: ids})
	publish(t, pub, entity, big)
	nokey := []byte(`{"note":"names no key"}`)
	publish(t, pub, entity, nokey)
	for _, rec := range []*recorder{r, idle} {
		rec.awaitAll(t, s.ft.Timeout, [][]byte{big, nokey}, ": a batch above esq.MaxRoutedKeys, and a body naming no key, go to every subscriber")
	}
	if n := idle.namedIDs()["b"]; n != 0 {
		t.Errorf("a subscriber watching nothing received the small batch's key b %d times", n)
	}
}

func (s *suite) publishKey(t *testing.T) {
	const entity shared.EntityType = "rt_key"
	r := newRecorder("subscriber watching k")
	sub, pub := s.routedPair(t, entity, r)
	kq := esq.Keys(pub)
	if kq == nil {
		t.Skipf("%T is not an esq.KeyQueue", pub)
	}
	other := newRecorder("subscriber watching another key")
	osub := s.queue(t)
	subscribe(t, osub, entity, other)
	watch(t, osub, shared.EntityKey{Entity: entity, ID: "other"})
	k := shared.EntityKey{Entity: entity, ID: "k"}
	watch(t, sub, k)
	if err := kq.PublishKey(context.Background(), k); err != nil {
		t.Fatalf("PublishKey(%s): %v", k, err)
	}
	r.awaitAll(t, s.ft.Timeout, [][]byte{esq.KeyBody(k)}, ": PublishKey sends esq.KeyBody on the key's route")
	// Then a message for the other subscriber, after which k's would have
	// arrived there too.
	if err := kq.PublishKey(context.Background(), shared.EntityKey{Entity: entity, ID: "other"}); err != nil {
		t.Fatal(err)
	}
	other.awaitID(t, s.ft.Timeout, "other", 1)
	if n := other.namedIDs()["k"]; n != 0 {
		t.Errorf("a subscriber watching another key received k %d times", n)
	}
}

func (s *suite) watchAfterRestart(t *testing.T) {
	const entity shared.EntityType = "rt_restart"
	r := newRecorder("subscriber")
	lost := make(chan struct{}, 16)
	r.lossHook = func(int) {
		select {
		case lost <- struct{}{}:
		default:
		}
	}
	sub, pub := s.routedPair(t, entity, r)
	// Many keys, so that the broker confirms them one by one after the
	// restart: onLoss must wait for all of them.
	const keys = 200
	for i := 0; i < keys; i++ {
		watch(t, sub, shared.EntityKey{Entity: entity, ID: "w" + strconv.Itoa(i)})
	}
	if err := s.f.Broker.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := s.f.Broker.Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lost:
	case <-time.After(s.ft.Timeout):
		t.Fatal("no onLoss after the broker restarted")
	}
	deadline := time.Now().Add(s.ft.Timeout)
	for i := 0; i < keys; i++ {
		if err := publishRetrying(pub, entity, body(entity, "w"+strconv.Itoa(i)), deadline, nil); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < keys; i++ {
		r.awaitID(t, s.ft.Timeout, "w"+strconv.Itoa(i), 1)
	}
}

func (s *suite) closeWatching(t *testing.T) {
	const entity shared.EntityType = "rt_close"
	const keys = 10
	// Made before the goroutine snapshot: they keep running.
	helpers := s.queues(t, 2)
	pub, witness := helpers[0], helpers[1]
	witnessRec := newRecorder("witness")
	subscribe(t, witness, entity, witnessRec)
	for i := 0; i < keys; i++ {
		watch(t, witness, shared.EntityKey{Entity: entity, ID: "k" + strconv.Itoa(i)})
	}

	before := goroutineIDs()
	q := s.queue(t)
	r := newRecorder("queue under test")
	subscribe(t, q, entity, r)
	for i := 0; i < keys; i++ {
		watch(t, q, shared.EntityKey{Entity: entity, ID: "k" + strconv.Itoa(i)})
		publish(t, pub, entity, body(entity, "k"+strconv.Itoa(i)))
	}
	for i := 0; i < keys; i++ {
		r.awaitID(t, s.ft.Timeout, "k"+strconv.Itoa(i), 1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.ft.Timeout)
	defer cancel()
	if err := q.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	r.closed.Store(true)
	for i := 0; i < keys; i++ {
		publish(t, pub, entity, body(entity, "k"+strconv.Itoa(i)))
	}
	for i := 0; i < keys; i++ {
		witnessRec.awaitID(t, s.ft.Timeout, "k"+strconv.Itoa(i), 2)
	}
	if n := r.late.Load(); n > 0 {
		t.Errorf("%d callbacks ran after Close returned", n)
	}
	awaitNoNewGoroutines(t, before, s.ft.BrokerGoroutines, s.ft.Timeout)
}
