package esqtest

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

const loadBalanceHint = ": does every instance get every message? Instances sharing a consumer group, queue group or channel load-balance instead of broadcasting"

func (s *suite) broadcast(t *testing.T) {
	const entity shared.EntityType = "bcast"
	const subscribers, each = 3, 100
	subs := s.queues(t, subscribers)
	pub := subs[0]
	if !s.ft.SingleProcess {
		pub = s.queue(t) // an instance that publishes without subscribing
	}
	recs := make([]*recorder, subscribers)
	for i := range recs {
		if s.ft.SingleProcess && i > 0 {
			recs = recs[:1]
			break
		}
		recs[i] = newRecorder(fmt.Sprintf("subscriber %d", i))
		subscribe(t, subs[i], entity, recs[i])
	}
	// From an instance that does not subscribe, and from a subscriber,
	// which receives its own messages too.
	var want [][]byte
	for i := 0; i < each; i++ {
		b := body(entity, "from-publisher-"+strconv.Itoa(i))
		publish(t, pub, entity, b)
		want = append(want, b)
		b = body(entity, "from-subscriber-"+strconv.Itoa(i))
		publish(t, subs[0], entity, b)
		want = append(want, b)
	}
	for _, r := range recs {
		r.awaitAll(t, s.ft.Timeout, want, loadBalanceHint)
	}
	for _, r := range recs {
		r.checkOnly(t, want, s.ft.Duplicates)
	}
}

func (s *suite) topicIsolation(t *testing.T) {
	// Names that share prefixes: a queue that matched by prefix or pattern
	// would mix them.
	entities := []shared.EntityType{"iso_items", "iso_items2", "iso_item", "iso_users"}
	const nobody shared.EntityType = "iso_nobody"
	const each = 20
	qs := s.queues(t, 2)
	sub, pub := qs[0], qs[1]
	recs := make(map[shared.EntityType]*recorder)
	for _, e := range entities {
		recs[e] = newRecorder("subscriber of " + string(e))
		subscribe(t, sub, e, recs[e])
	}
	// First messages nobody subscribed to, then each type's own.
	for i := 0; i < each; i++ {
		publish(t, pub, nobody, body(nobody, strconv.Itoa(i)))
	}
	want := make(map[shared.EntityType][][]byte)
	for i := 0; i < each; i++ {
		for _, e := range entities {
			b := body(e, strconv.Itoa(i))
			publish(t, pub, e, b)
			want[e] = append(want[e], b)
		}
	}
	for _, e := range entities {
		recs[e].awaitAll(t, s.ft.Timeout, want[e], "")
	}
	for _, e := range entities {
		recs[e].checkOnly(t, want[e], s.ft.Duplicates)
	}
}

func (s *suite) liveOnReturn(t *testing.T) {
	const rounds = 10
	qs := s.queues(t, 2)
	sub, pub := qs[0], qs[1]
	for i := 0; i < rounds; i++ {
		entity := shared.EntityType("live_" + strconv.Itoa(i))
		r := newRecorder("subscriber of " + string(entity))
		subscribe(t, sub, entity, r)
		if lr, ok := sub.(esq.LiveReporter); ok {
			if err := lr.Live(); err != nil {
				t.Errorf("Live right after Subscribe returned: %v", err)
			}
		}
		// At once, with nothing in between: delivery must already be live.
		fromOther, fromSelf := body(entity, "from-other"), body(entity, "from-self")
		publish(t, pub, entity, fromOther)
		want := [][]byte{fromOther}
		if !s.ft.SingleProcess {
			publish(t, sub, entity, fromSelf)
			want = append(want, fromSelf)
		}
		r.awaitAll(t, s.ft.Timeout, want, ": a message published at once after Subscribe returned was lost, so Subscribe returned before delivery was live")
	}
}

func (s *suite) subscribeTwice(t *testing.T) {
	const entity shared.EntityType = "twice"
	q := s.queue(t)
	r := newRecorder("first subscription")
	subscribe(t, q, entity, r)
	err := q.Subscribe(entity, func([]byte) {}, nil)
	if !errors.Is(err, esq.ErrAlreadySubscribed) {
		t.Fatalf("second Subscribe to %q on one queue: got %v, want esq.ErrAlreadySubscribed", entity, err)
	}
	// The first subscription is untouched.
	b := body(entity, "after")
	publish(t, q, entity, b)
	r.awaitAll(t, s.ft.Timeout, [][]byte{b}, "")
}

func (s *suite) concurrent(t *testing.T) {
	const goroutines, each, noisePublishers, noiseEach = 8, 50, 4, 100
	const noise shared.EntityType = "conc_noise"
	qs := s.queues(t, 3)
	a, b, c := qs[0], qs[1], qs[2]
	noiseRec := newRecorder("subscriber of " + string(noise))
	subscribe(t, c, noise, noiseRec)

	recs := make([]*recorder, goroutines)
	wants := make([][][]byte, goroutines)
	var noiseWant [][]byte
	for p := 0; p < noisePublishers; p++ {
		for i := 0; i < noiseEach; i++ {
			noiseWant = append(noiseWant, body(noise, fmt.Sprintf("p%d-%d", p, i)))
		}
	}
	errs := make(chan error, goroutines*2+noisePublishers+2)
	var wg sync.WaitGroup
	// Goroutines that each subscribe on a and then publish from a and b,
	// while the others do the same and the noise publishers publish.
	for g := 0; g < goroutines; g++ {
		entity := shared.EntityType("conc_" + strconv.Itoa(g))
		recs[g] = newRecorder("subscriber of " + string(entity))
		for i := 0; i < each; i++ {
			wants[g] = append(wants[g], body(entity, "a-"+strconv.Itoa(i)), body(entity, "b-"+strconv.Itoa(i)))
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := a.Subscribe(entity, recs[g].onMessage, recs[g].onLoss); err != nil {
				errs <- fmt.Errorf("subscribe %q: %w", entity, err)
				return
			}
			for i := 0; i < each; i++ {
				if err := publishErr(a, entity, wants[g][2*i]); err != nil {
					errs <- err
					return
				}
				if err := publishErr(b, entity, wants[g][2*i+1]); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for p := 0; p < noisePublishers; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			q := a
			if p%2 == 1 {
				q = b
			}
			for i := 0; i < noiseEach; i++ {
				if err := publishErr(q, noise, noiseWant[p*noiseEach+i]); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	// Two goroutines subscribing to one type on one instance: exactly one
	// wins.
	const dup shared.EntityType = "conc_dup"
	dupErrs := make(chan error, 2)
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dupErrs <- b.Subscribe(dup, func([]byte) {}, nil)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	e1, e2 := <-dupErrs, <-dupErrs
	if (e1 == nil) == (e2 == nil) || !(errors.Is(e1, esq.ErrAlreadySubscribed) || errors.Is(e2, esq.ErrAlreadySubscribed)) {
		t.Errorf("two concurrent Subscribes to %q: got %v and %v, want one nil and one esq.ErrAlreadySubscribed", dup, e1, e2)
	}
	for g, r := range recs {
		r.awaitAll(t, s.ft.Timeout, wants[g], "")
	}
	noiseRec.awaitAll(t, s.ft.Timeout, noiseWant, "")
	for g, r := range recs {
		r.checkOnly(t, wants[g], s.ft.Duplicates)
	}
	noiseRec.checkOnly(t, noiseWant, s.ft.Duplicates)
}

func publishErr(q esq.Queue, entity shared.EntityType, b []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := q.Publish(ctx, entity, b); err != nil {
		return fmt.Errorf("publish on %q: %w", entity, err)
	}
	return nil
}

func (s *suite) invalidEntities(t *testing.T) {
	if len(s.ft.InvalidEntities) == 0 {
		t.Skip("Features.InvalidEntities is empty: the queue takes every entity type")
	}
	qs := s.queues(t, 2)
	sub, pub := qs[0], qs[1]
	for _, e := range s.ft.InvalidEntities {
		name := string(e)
		if len(name) > 40 {
			name = name[:20] + "..." + strconv.Itoa(len(name)) + " bytes"
		}
		err := pub.Publish(context.Background(), e, body(e, "1"))
		checkRefusal(t, "Publish", name, err)
		err = sub.Subscribe(e, func([]byte) { t.Errorf("message delivered on invalid entity type %q", name) }, nil)
		checkRefusal(t, "Subscribe", name, err)
	}
	// The queue still works.
	const entity shared.EntityType = "invalid_after"
	r := newRecorder("subscriber of " + string(entity))
	subscribe(t, sub, entity, r)
	b := body(entity, "1")
	publish(t, pub, entity, b)
	r.awaitAll(t, s.ft.Timeout, [][]byte{b}, "")
}

func checkRefusal(t *testing.T, op, name string, err error) {
	t.Helper()
	switch {
	case err == nil:
		t.Errorf("%s with invalid entity type %q: no error", op, name)
	case errors.Is(err, esq.ErrClosed):
		t.Errorf("%s with invalid entity type %q: %v (the queue is not closed)", op, name, err)
	case strings.TrimSpace(err.Error()) == "":
		t.Errorf("%s with invalid entity type %q: an error with no text", op, name)
	default:
		t.Logf("%s %q refused: %v", op, name, err)
	}
}

func (s *suite) oversized(t *testing.T) {
	if s.ft.MaxPayload <= 0 {
		t.Skip("Features.MaxPayload is 0: the queue has no size limit")
	}
	const entity shared.EntityType = "oversized"
	qs := s.queues(t, 2)
	sub, pub := qs[0], qs[1]
	r := newRecorder("subscriber of " + string(entity))
	subscribe(t, sub, entity, r)

	err := pub.Publish(context.Background(), entity, sized(entity, "too-big", s.ft.MaxPayload+1))
	limit := strconv.Itoa(s.ft.MaxPayload)
	switch {
	case err == nil:
		t.Errorf("Publish of %d bytes (limit %d): no error", s.ft.MaxPayload+1, s.ft.MaxPayload)
	case !strings.Contains(err.Error(), limit):
		t.Errorf("Publish of %d bytes: error %q does not name the limit (%s)", s.ft.MaxPayload+1, err, limit)
	default:
		t.Logf("%d bytes refused: %v", s.ft.MaxPayload+1, err)
	}
	// The largest allowed body goes through, and so does a small one after
	// it (the refusal broke nothing).
	big, small := sized(entity, "largest", s.ft.MaxPayload), body(entity, "small")
	publish(t, pub, entity, big)
	publish(t, pub, entity, small)
	r.awaitAll(t, s.ft.Timeout, [][]byte{big, small}, "")
	r.checkOnly(t, [][]byte{big, small}, s.ft.Duplicates)
}

// sized returns a JSON key of exactly n bytes (a padding field fills it), or
// as close as the key allows.
func sized(entity shared.EntityType, id string, n int) []byte {
	head := fmt.Sprintf(`{"entity":%q,"id":%q,"pad":"`, entity, id)
	pad := n - len(head) - 2
	if pad < 0 {
		pad = 0
	}
	return []byte(head + strings.Repeat("x", pad) + `"}`)
}

func (s *suite) publishAfterClose(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), s.ft.Timeout)
	defer cancel()
	// A queue that was used, and one that never was.
	used := s.queue(t)
	subscribe(t, used, "closed_used", newRecorder("subscriber"))
	publish(t, used, "closed_used", body("closed_used", "1"))
	fresh := s.queue(t)
	for name, q := range map[string]esq.Queue{"used": used, "never used": fresh} {
		if err := q.Close(ctx); err != nil {
			t.Errorf("%s queue: Close: %v", name, err)
		}
		if err := q.Publish(ctx, "closed_used", body("closed_used", "2")); !errors.Is(err, esq.ErrClosed) {
			t.Errorf("%s queue: Publish after Close: got %v, want esq.ErrClosed", name, err)
		}
		if err := q.Subscribe("closed_other", func([]byte) {}, nil); !errors.Is(err, esq.ErrClosed) {
			t.Errorf("%s queue: Subscribe after Close: got %v, want esq.ErrClosed", name, err)
		}
		if lr, ok := q.(esq.LiveReporter); ok {
			if err := lr.Live(); !errors.Is(err, esq.ErrClosed) {
				t.Errorf("%s queue: Live after Close: got %v, want esq.ErrClosed", name, err)
			}
		}
		done := make(chan error, 1)
		go func() { done <- q.Close(ctx) }()
		select {
		case err := <-done:
			t.Logf("%s queue: second Close: %v", name, err)
		case <-ctx.Done():
			t.Errorf("%s queue: second Close did not return", name)
		}
	}
}

func (s *suite) close(t *testing.T) {
	const entities = 3
	// Helpers made before the goroutine snapshot: a publisher and a
	// witness subscriber that keep running after the queue under test
	// closes.
	helpers := s.queues(t, 2)
	pub, witness := helpers[0], helpers[1]
	ents := make([]shared.EntityType, entities)
	for i := range ents {
		ents[i] = shared.EntityType("close_" + strconv.Itoa(i))
	}
	var witnessRec *recorder
	if !s.ft.SingleProcess {
		witnessRec = newRecorder("witness")
		for _, e := range ents {
			subscribe(t, witness, e, witnessRec)
		}
		warm := body(ents[0], "warm-up")
		publish(t, pub, ents[0], warm)
		witnessRec.awaitAll(t, s.ft.Timeout, [][]byte{warm}, "")
	}

	before := goroutineIDs()
	q := pub // SingleProcess: the one instance is the one under test
	if !s.ft.SingleProcess {
		q = s.queue(t)
	}
	r := newRecorder("queue under test")
	var want [][]byte
	for _, e := range ents {
		subscribe(t, q, e, r)
	}
	for _, e := range ents {
		b := body(e, "before-close-self")
		publish(t, q, e, b)
		want = append(want, b)
		if !s.ft.SingleProcess {
			b = body(e, "before-close-other")
			publish(t, pub, e, b)
			want = append(want, b)
		}
	}
	r.awaitAll(t, s.ft.Timeout, want, "")

	ctx, cancel := context.WithTimeout(context.Background(), s.ft.Timeout)
	defer cancel()
	if err := q.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	r.closed.Store(true)
	if !s.ft.SingleProcess {
		// Messages published after Close reach the witness; by then any
		// the closed queue might still deliver would have arrived too.
		var after [][]byte
		for _, e := range ents {
			for i := 0; i < 20; i++ {
				b := body(e, "after-close-"+strconv.Itoa(i))
				publish(t, pub, e, b)
				after = append(after, b)
			}
		}
		witnessRec.awaitAll(t, s.ft.Timeout, after, "")
	}
	if n := r.late.Load(); n > 0 {
		t.Errorf("%d callbacks ran after Close returned", n)
	}
	awaitNoNewGoroutines(t, before, s.ft.BrokerGoroutines, s.ft.Timeout)
}
