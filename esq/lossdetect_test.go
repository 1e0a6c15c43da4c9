package esq

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/entity-sync/entity-sync/shared"
)

// fakeBroker is a Queue whose test decides what is delivered, in what order:
// every publish lands on sent, and deliver hands a body to the subscriber.
type fakeBroker struct {
	sent chan []byte

	mu     sync.Mutex
	subs   map[shared.EntityType]func([]byte)
	losses map[shared.EntityType]func()
	closed bool
}

func newFakeBroker() *fakeBroker {
	return &fakeBroker{sent: make(chan []byte, 10000),
		subs: map[shared.EntityType]func([]byte){}, losses: map[shared.EntityType]func(){}}
}

func (f *fakeBroker) Publish(_ context.Context, _ shared.EntityType, body []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return ErrClosed
	}
	f.sent <- append([]byte(nil), body...)
	return nil
}

func (f *fakeBroker) Subscribe(entity shared.EntityType, onMessage func([]byte), onLoss func()) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.subs[entity], f.losses[entity] = onMessage, onLoss
	return nil
}

func (f *fakeBroker) Close(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}

func (f *fakeBroker) deliver(entity shared.EntityType, body []byte) {
	f.mu.Lock()
	fn := f.subs[entity]
	f.mu.Unlock()
	fn(body)
}

// next returns the next published body (in a synctest bubble, time runs on
// until a timer publishes one).
func (f *fakeBroker) next(t *testing.T) []byte {
	t.Helper()
	select {
	case b := <-f.sent:
		return b
	case <-time.After(time.Hour):
		t.Fatal("nothing published")
		return nil
	}
}

// events records what the subscriber saw, in order: "msg <id>" per message,
// "loss" per onLoss call.
type events struct {
	mu  sync.Mutex
	log []string
}

func (e *events) onMessage(b []byte) {
	var k shared.EntityKey
	if err := json.Unmarshal(b, &k); err != nil {
		panic(fmt.Sprintf("body %q: %v", b, err))
	}
	e.add("msg " + k.ID)
}

func (e *events) onLoss() { e.add("loss") }

func (e *events) add(s string) {
	e.mu.Lock()
	e.log = append(e.log, s)
	e.mu.Unlock()
}

func (e *events) String() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return strings.Join(e.log, ", ")
}

func (e *events) expect(t *testing.T, want string) {
	t.Helper()
	if got := e.String(); got != want {
		t.Fatalf("subscriber saw [%s], want [%s]", got, want)
	}
}

// quietDetector is a detector whose loss warnings go to hook, not stderr.
func quietDetector(q Queue) *lossDetector {
	d := newLossDetector(q, defaultLossTiming)
	l, _ := logtest.NewNullLogger()
	d.log = l
	return d
}

func keyBody(id string) []byte {
	b, _ := json.Marshal(shared.EntityKey{Entity: "items", ID: id})
	return b
}

// setup returns a detector over a fake broker, subscribed to "items", with
// ids 1..n published and their stamped bodies.
func setup(t *testing.T, n int) (*lossDetector, *fakeBroker, *events, [][]byte) {
	t.Helper()
	f := newFakeBroker()
	d := quietDetector(f)
	ev := &events{}
	if err := d.Subscribe("items", ev.onMessage, ev.onLoss); err != nil {
		t.Fatal(err)
	}
	var bodies [][]byte
	for i := 1; i <= n; i++ {
		if err := d.Publish(context.Background(), "items", keyBody(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
		bodies = append(bodies, f.next(t))
	}
	return d, f, ev, bodies
}

func mustMark(t *testing.T, b []byte, wantN uint64) {
	t.Helper()
	_, n, mark, ok := parseStamp(b)
	if !ok || !mark || n != wantN {
		t.Fatalf("published %s, want a mark with n=%d", b, wantN)
	}
}

func TestStampedBodyIsTheKeyWithOneField(t *testing.T) {
	d := quietDetector(newFakeBroker())
	body := stamp(keyBody("100"), len(keyBody("100"))-1, d.id, 42)
	want := `{"entity":"items","id":"100","_es":{"p":"` + d.id + `","n":42}}`
	if string(body) != want {
		t.Fatalf("stamped body %s, want %s", body, want)
	}
	// The bridge decodes the key with encoding/json, which ignores the
	// extra field.
	var k shared.EntityKey
	if err := json.Unmarshal(body, &k); err != nil || k != (shared.EntityKey{Entity: "items", ID: "100"}) {
		t.Fatalf("decoded %+v, %v", k, err)
	}
	pub, n, mark, ok := parseStamp(body)
	if !ok || mark || n != 42 || string(pub) != d.id {
		t.Fatalf("parseStamp(%s) = %s %d %v %v", body, pub, n, mark, ok)
	}
	var v map[string]any
	if err := json.Unmarshal(markBody(d.id, 7), &v); err != nil {
		t.Fatalf("mark is not JSON: %v", err)
	}
	if _, n, mark, ok := parseStamp(markBody(d.id, 7)); !ok || !mark || n != 7 {
		t.Fatalf("mark not parsed: %d %v %v", n, mark, ok)
	}
}

func TestStampAtAndParseEdgeCases(t *testing.T) {
	for _, c := range []struct {
		body  string
		stamp bool
		want  string // the stamped body, with id "p" and n 1
	}{
		{`{"id":"1"}`, true, `{"id":"1","_es":{"p":"p","n":1}}`},
		{" {\"id\":\"1\"} \n", true, ` {"id":"1","_es":{"p":"p","n":1}}`},
		{`{"id":"1" }`, true, `{"id":"1" ,"_es":{"p":"p","n":1}}`},
		{`{}`, false, ""},
		{`{ }`, false, ""},
		{`[1]`, false, ""},
		{`"x"`, false, ""},
		{``, false, ""},
		{`}`, false, ""},
	} {
		at, ok := stampAt([]byte(c.body))
		if ok != c.stamp {
			t.Errorf("stampAt(%q) = %v, want %v", c.body, ok, c.stamp)
			continue
		}
		if !ok {
			continue
		}
		got := stamp([]byte(c.body), at, "p", 1)
		if string(got) != c.want {
			t.Errorf("stamp(%q) = %s, want %s", c.body, got, c.want)
		}
		var v map[string]any
		if err := json.Unmarshal(got, &v); err != nil {
			t.Errorf("stamp(%q) = %s: not JSON: %v", c.body, got, err)
		}
	}
	for _, b := range []string{
		`{"id":"1"}`,
		`{"id":"1","_es":{"p":"a","n":0}}`,
		`{"id":"1","_es":{"p":"a","n":-1}}`,
		`{"id":"1","_es":{"p":"a","n":1x}}`,
		`{"id":"1","_es":{"p":"a","n":}}`,
		`{"id":"1","_es":{"p":"","n":1}}`,
		`{"id":"1","_es":{"p":"a","n":99999999999999999999}}`,
		`{"id":"1" "_es":{"p":"a","n":1}}`,
		`x{"_es":{"p":"a","n":1}}`,
		`{"id":"1","_es":{"p":"a","n":1}} `,
	} {
		if _, _, _, ok := parseStamp([]byte(b)); ok {
			t.Errorf("parseStamp(%s) accepted a malformed stamp", b)
		}
	}
}

func TestLossGapInTheMiddleAfterGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, f, ev, m := setup(t, 3)
		defer d.Close(context.Background())
		f.deliver("items", m[0])
		f.deliver("items", m[2]) // 2 dropped
		ev.expect(t, "msg 1, msg 3")
		// A late message may still fill the hole within grace.
		time.Sleep(defaultLossTiming.grace - time.Millisecond)
		synctest.Wait()
		ev.expect(t, "msg 1, msg 3")
		time.Sleep(time.Millisecond)
		synctest.Wait()
		ev.expect(t, "msg 1, msg 3, loss")
		// Reported once: the marks and a late 2 change nothing.
		f.deliver("items", f.next(t))
		f.deliver("items", m[1])
		ev.expect(t, "msg 1, msg 3, loss, msg 2")
	})
}

func TestLossGapConfirmedByMark(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, f, ev, m := setup(t, 4)
		defer d.Close(context.Background())
		start := time.Now()
		f.deliver("items", m[0])
		f.deliver("items", m[3]) // 2 and 3 dropped
		mark := f.next(t)
		mustMark(t, mark, 4)
		// Between marks[0] and twice that after the last publish.
		if waited, m0 := time.Since(start), defaultLossTiming.marks[0]; waited < m0 || waited > 2*m0 {
			t.Fatalf("mark sent after %s, want %s to %s", waited, m0, 2*m0)
		}
		f.deliver("items", mark)
		ev.expect(t, "msg 1, msg 4, loss")
		time.Sleep(time.Minute)
		synctest.Wait()
		ev.expect(t, "msg 1, msg 4, loss") // the grace timer does not report it again
	})
}

func TestLossAtTheEndOfABurstDetectedByMark(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, f, ev, m := setup(t, 3)
		defer d.Close(context.Background())
		f.deliver("items", m[0]) // 2 and 3 dropped: nothing later from this publisher
		mark := f.next(t)
		mustMark(t, mark, 3)
		ev.expect(t, "msg 1")
		f.deliver("items", mark)
		ev.expect(t, "msg 1, loss") // the mark reaches no onMessage
	})
}

func TestLossDetectedByLaterMarkWhenFirstMarkDropped(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, f, ev, m := setup(t, 3)
		defer d.Close(context.Background())
		start := time.Now()
		f.deliver("items", m[0])
		mustMark(t, f.next(t), 3) // dropped
		second := f.next(t)
		mustMark(t, second, 3)
		if waited, m := time.Since(start), defaultLossTiming.marks; waited < m[1] || waited > m[1]+m[0] {
			t.Fatalf("second mark sent after %s, want %s to %s", waited, m[1], m[1]+m[0])
		}
		f.deliver("items", second)
		ev.expect(t, "msg 1, loss")
	})
}

func TestLossMarkScheduleAndQuietAfterwards(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, f, _, _ := setup(t, 1)
		defer d.Close(context.Background())
		start := time.Now()
		for _, at := range defaultLossTiming.marks {
			mustMark(t, f.next(t), 1)
			if got := time.Since(start); got != at {
				t.Fatalf("mark at %s, want %s", got, at)
			}
		}
		time.Sleep(24 * time.Hour)
		if n := len(f.sent); n != 0 {
			t.Fatalf("%d more messages published with nobody publishing", n)
		}
		// While publishes continue, the first mark waits for a quiet
		// interval of marks[0]: here 400 ms after the first of two
		// publishes 100 ms apart.
		if err := d.Publish(context.Background(), "items", keyBody("x")); err != nil {
			t.Fatal(err)
		}
		f.next(t)
		start = time.Now()
		time.Sleep(100 * time.Millisecond)
		if err := d.Publish(context.Background(), "items", keyBody("y")); err != nil {
			t.Fatal(err)
		}
		f.next(t)
		mustMark(t, f.next(t), 3)
		if got, want := time.Since(start), 2*defaultLossTiming.marks[0]; got != want {
			t.Fatalf("mark %s after the first of two publishes, want %s", got, want)
		}
		// A publish while the schedule waits for a later mark restarts it:
		// the next mark comes marks[0] after the publish, not at 2 s.
		time.Sleep(time.Second)
		if err := d.Publish(context.Background(), "items", keyBody("z")); err != nil {
			t.Fatal(err)
		}
		f.next(t)
		start = time.Now()
		mustMark(t, f.next(t), 4)
		if got := time.Since(start); got != defaultLossTiming.marks[0] {
			t.Fatalf("mark %s after a publish mid-schedule, want %s", got, defaultLossTiming.marks[0])
		}
	})
}

func TestLossReorderAndDuplicatesAreNotAGap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, f, ev, m := setup(t, 5)
		defer d.Close(context.Background())
		for _, i := range []int{0, 2, 1, 1, 4, 3, 0} {
			f.deliver("items", m[i])
		}
		ev.expect(t, "msg 1, msg 3, msg 2, msg 2, msg 5, msg 4, msg 1")
		f.deliver("items", f.next(t)) // the mark finds no hole
		time.Sleep(time.Hour)         // nor does the grace timer
		synctest.Wait()
		ev.expect(t, "msg 1, msg 3, msg 2, msg 2, msg 5, msg 4, msg 1")
	})
}

func TestLossFirstSightingIsNotAGap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeBroker()
		d := quietDetector(f)
		defer d.Close(context.Background())
		ev := &events{}
		if err := d.Subscribe("items", ev.onMessage, ev.onLoss); err != nil {
			t.Fatal(err)
		}
		// Publishers that started before this subscriber.
		f.deliver("items", stamp(keyBody("a"), len(keyBody("a"))-1, "pub-a", 57))
		f.deliver("items", markBody("pub-b", 12))
		f.deliver("items", stamp(keyBody("b"), len(keyBody("b"))-1, "pub-b", 13))
		f.deliver("items", stamp(keyBody("a2"), len(keyBody("a2"))-1, "pub-a", 58))
		time.Sleep(time.Hour)
		synctest.Wait()
		ev.expect(t, "msg a, msg b, msg a2")
		// Publishers are told apart: a gap in one is a loss.
		f.deliver("items", markBody("pub-b", 15))
		ev.expect(t, "msg a, msg b, msg a2, loss")
	})
}

// A publisher that started after the subscription (a server restarted
// elsewhere) should have had every number from 1 delivered: the numbers below
// the first one heard are a hole. The soak run found subscriptions left one
// version behind when a restarted server's first notifications were lost and
// its later ones, or its marks, were the first this server heard of it.
func TestLossFirstSightingOfANewPublisherStartsAtOne(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeBroker()
		d := quietDetector(f)
		defer d.Close(context.Background())
		ev := &events{}
		if err := d.Subscribe("items", ev.onMessage, ev.onLoss); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Minute)
		started := publisherID(time.Now(), "0123456789abcdef")

		// Its first message heard is its third: 1 and 2 are a hole, a
		// loss once they are a grace period late.
		f.deliver("items", stamp(keyBody("c"), len(keyBody("c"))-1, started, 3))
		time.Sleep(defaultLossTiming.grace / 2)
		synctest.Wait()
		ev.expect(t, "msg c")
		time.Sleep(defaultLossTiming.grace)
		synctest.Wait()
		ev.expect(t, "msg c, loss")

		// All its messages lost: its first mark is the first sighting.
		time.Sleep(defaultLossTiming.resyncEvery) // past the rate limit's window
		marked := publisherID(time.Now(), "fedcba9876543210")
		f.deliver("items", markBody(marked, 2))
		ev.expect(t, "msg c, loss, loss")

		// One that starts at 1 opens no hole, even out of order.
		inOrder := publisherID(time.Now(), "00000000000000aa")
		f.deliver("items", stamp(keyBody("x"), len(keyBody("x"))-1, inOrder, 2))
		f.deliver("items", stamp(keyBody("y"), len(keyBody("y"))-1, inOrder, 1))
		f.deliver("items", markBody(inOrder, 2))
		time.Sleep(time.Hour)
		synctest.Wait()
		ev.expect(t, "msg c, loss, loss, msg x, msg y")
	})
}

// Publishers that started before the subscription, or longer ago than the
// forget period (they may have been heard and forgotten), are taken as they
// come, as before.
func TestLossFirstSightingOfAnOlderPublisherIsNotAGap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeBroker()
		d := quietDetector(f)
		defer d.Close(context.Background())
		before := publisherID(time.Now().Add(-time.Second), "0123456789abcdef")
		time.Sleep(time.Second)
		ev := &events{}
		if err := d.Subscribe("items", ev.onMessage, ev.onLoss); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		after := publisherID(time.Now(), "fedcba9876543210")
		f.deliver("items", stamp(keyBody("a"), len(keyBody("a"))-1, before, 40))
		f.deliver("items", markBody(before, 41))
		time.Sleep(time.Hour)
		synctest.Wait()
		ev.expect(t, "msg a, loss") // 41 was never heard: a hole as ever
		time.Sleep(defaultLossTiming.forget)
		f.deliver("items", markBody(after, 7))
		time.Sleep(time.Hour)
		synctest.Wait()
		ev.expect(t, "msg a, loss")
	})
}

func TestPublisherIDCarriesItsStartTime(t *testing.T) {
	at := time.UnixMilli(1764160000123)
	id := publisherID(at, "0123456789abcdef")
	got, ok := publisherStart([]byte(id))
	if !ok || !got.Equal(at) {
		t.Fatalf("publisherStart(%q) = %v, %v; want %v", id, got, ok, at)
	}
	for _, bad := range []string{"", "-", "pub-a", "0123456789abcdef", "zz-01", "-01", "00000000000000000-01", "0-01"} {
		if _, ok := publisherStart([]byte(bad)); ok {
			t.Errorf("publisherStart(%q) found a start time", bad)
		}
	}
}

func TestLossUnstampedMessagesPassThrough(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeBroker()
		d := quietDetector(f)
		defer d.Close(context.Background())
		var got []string
		if err := d.Subscribe("items", func(b []byte) { got = append(got, string(b)) }, func() { t.Error("onLoss called") }); err != nil {
			t.Fatal(err)
		}
		// A producer outside Go sends the plain key (e.g. nsqd's HTTP /pub).
		plain := []string{`{"entity":"items","id":"9"}`, `{"id":"10"}`, `not json`, `{"id":"1","_es":"x"}`}
		for _, b := range plain {
			f.deliver("items", []byte(b))
		}
		if strings.Join(got, "|") != strings.Join(plain, "|") {
			t.Fatalf("onMessage got %q, want %q", got, plain)
		}
		// What is not a non-empty object is published as it is, and
		// starts no marks.
		for _, b := range []string{`{}`, `[1]`, `"x"`} {
			if err := d.Publish(context.Background(), "items", []byte(b)); err != nil {
				t.Fatal(err)
			}
			if p := string(f.next(t)); p != b {
				t.Fatalf("published %s as %s", b, p)
			}
		}
		time.Sleep(time.Hour)
		if n := len(f.sent); n != 0 {
			t.Fatalf("%d marks for unstamped messages", n)
		}
	})
}

func TestLossWrappedQueueOnLossPassedThrough(t *testing.T) {
	f := newFakeBroker()
	d := DetectLoss(f, nil)
	defer d.Close(context.Background())
	ev := &events{}
	if err := d.Subscribe("items", ev.onMessage, ev.onLoss); err != nil {
		t.Fatal(err)
	}
	f.losses["items"]()
	ev.expect(t, "loss")
	if DetectLoss(d, nil) != d {
		t.Fatal("DetectLoss wrapped its own queue again")
	}
}

// deliverHoles delivers every other message of m (the first, the third...),
// leaving a hole at each second one, and returns the held-back ones.
func deliverHoles(f *fakeBroker, m [][]byte) (held [][]byte) {
	for i := range m {
		if i%2 == 0 {
			f.deliver("items", m[i])
		} else {
			held = append(held, m[i])
		}
	}
	return held
}

// Many concurrent writers make many holes at once, and late messages fill
// them: that is no loss, however many there are.
func TestLossManyHolesThatFillWithinGraceAreNoLoss(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, f, ev, m := setup(t, 2*1000+1)
		defer d.Close(context.Background())
		held := deliverHoles(f, m) // 1,000 holes open
		if strings.Contains(ev.String(), "loss") {
			t.Fatal("a loss reported for holes that may still fill")
		}
		time.Sleep(defaultLossTiming.grace - time.Millisecond)
		for _, b := range held {
			f.deliver("items", b)
		}
		time.Sleep(time.Hour)
		synctest.Wait()
		if got := strings.Count(ev.String(), "loss"); got != 0 {
			t.Fatalf("%d losses reported for holes all filled within grace", got)
		}
	})
}

// Among many holes that fill, one that never does is a loss after grace,
// reported once.
func TestLossManyHolesOneNeverFillsIsALossAfterGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, f, ev, m := setup(t, 2*1000+1)
		defer d.Close(context.Background())
		held := deliverHoles(f, m)
		for _, b := range held[:len(held)-1] {
			f.deliver("items", b)
		}
		time.Sleep(defaultLossTiming.grace - time.Millisecond)
		synctest.Wait()
		if got := strings.Count(ev.String(), "loss"); got != 0 {
			t.Fatalf("%d losses reported within grace", got)
		}
		time.Sleep(time.Millisecond)
		synctest.Wait()
		if got := strings.Count(ev.String(), "loss"); got != 1 {
			t.Fatalf("%d losses reported after grace for one hole never filled, want 1", got)
		}
	})
}

// Holes beyond the bound are not recorded, so their late messages cannot
// fill them: they are a loss once grace has passed, not at once.
func TestLossHolesBeyondTheBoundAreALossAfterGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, f, ev, m := setup(t, 2*defaultLossTiming.maxHoles+5)
		defer d.Close(context.Background())
		held := deliverHoles(f, m) // maxHoles+2 holes
		for _, b := range held {
			f.deliver("items", b)
		}
		time.Sleep(defaultLossTiming.grace - time.Millisecond)
		synctest.Wait()
		if got := strings.Count(ev.String(), "loss"); got != 0 {
			t.Fatalf("%d losses reported within grace", got)
		}
		time.Sleep(time.Millisecond)
		synctest.Wait()
		if got := strings.Count(ev.String(), "loss"); got != 1 {
			t.Fatalf("%d losses reported after grace for holes beyond the bound, want 1", got)
		}
		d.subs[0].mu.Lock()
		defer d.subs[0].mu.Unlock()
		if d.subs[0].holes != 0 {
			t.Fatalf("%d holes still counted after the loss covered them all", d.subs[0].holes)
		}
	})
}

// Each hole waits for grace from when it opened: one that opened later than
// another of the same publisher, since filled, is not judged by the older
// one's time.
func TestLossEachHoleGetsItsOwnGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, f, ev, m := setup(t, 5)
		defer d.Close(context.Background())
		grace := defaultLossTiming.grace
		f.deliver("items", m[0])
		f.deliver("items", m[2]) // 2 missing
		time.Sleep(grace / 2)
		f.deliver("items", m[4]) // 4 missing
		time.Sleep(grace/2 - time.Millisecond)
		f.deliver("items", m[1]) // 2 arrives just in time
		time.Sleep(time.Millisecond)
		synctest.Wait()
		ev.expect(t, "msg 1, msg 3, msg 5, msg 2")
		time.Sleep(grace/2 - 2*time.Millisecond)
		f.deliver("items", m[3]) // 4 too
		time.Sleep(time.Hour)
		synctest.Wait()
		ev.expect(t, "msg 1, msg 3, msg 5, msg 2, msg 4")
	})
}

func TestLossForgetsSilentPublishers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeBroker()
		d := quietDetector(f)
		defer d.Close(context.Background())
		if err := d.Subscribe("items", func([]byte) {}, nil); err != nil {
			t.Fatal(err)
		}
		s := d.subs[0]
		for i := 0; i < 100; i++ {
			f.deliver("items", markBody(fmt.Sprint("gone-", i), 1))
		}
		// A sweep runs when a new publisher appears, at most once per
		// forget period, and drops those not heard from since the last.
		for round := 0; round < 3; round++ {
			time.Sleep(defaultLossTiming.forget)
			f.deliver("items", markBody(fmt.Sprint("new-", round), 1))
			f.deliver("items", markBody("alive", uint64(round+1)))
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		var ids []string
		for id := range s.peers {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		if got := strings.Join(ids, " "); got != "alive new-1 new-2" {
			t.Fatalf("publishers remembered: %s, want alive new-1 new-2", got)
		}
	})
}

// Concurrent publishers get their numbers in one order and reach the queue
// in another: no loss may be reported for that.
func TestLossConcurrentPublishersOnMemoryReportNoLoss(t *testing.T) {
	const publishers, each = 8, 500
	synctest.Test(t, func(t *testing.T) {
		mem := NewMemory()
		d := quietDetector(mem)
		var mu sync.Mutex
		received := 0
		if err := d.Subscribe("items", func([]byte) { mu.Lock(); received++; mu.Unlock() }, func() { t.Error("loss reported") }); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for p := 0; p < publishers; p++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < each; i++ {
					if err := d.Publish(context.Background(), "items", keyBody(fmt.Sprint(p, "-", i))); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		time.Sleep(time.Minute) // every mark and grace timer runs
		synctest.Wait()
		if received != publishers*each {
			t.Fatalf("received %d, want %d", received, publishers*each)
		}
		if err := d.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
	})
}

func TestLossCloseStopsMarksInABubble(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, f, _, m := setup(t, 3)
		f.deliver("items", m[0])
		f.deliver("items", m[2])
		if err := d.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		time.Sleep(24 * time.Hour)
		if n := len(f.sent); n != 0 {
			t.Fatalf("%d marks published after Close", n)
		}
	})
}

// One onLoss starts a resync that covers every hole open at that moment, of
// every publisher: they are not reported again.
func TestLossOneReportCoversEveryOpenHole(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeBroker()
		d := quietDetector(f)
		defer d.Close(context.Background())
		ev := &events{}
		if err := d.Subscribe("items", ev.onMessage, ev.onLoss); err != nil {
			t.Fatal(err)
		}
		msg := func(pub, id string, n uint64) []byte { return stamp(keyBody(id), len(keyBody(id))-1, pub, n) }
		f.deliver("items", msg("a", "a1", 1))
		f.deliver("items", msg("b", "b1", 1))
		f.deliver("items", msg("b", "b3", 3)) // b's 2 missing
		f.deliver("items", msg("a", "a3", 3)) // a's 2 missing
		f.deliver("items", markBody("a", 3))
		ev.expect(t, "msg a1, msg b1, msg b3, msg a3, loss")
		time.Sleep(time.Hour) // b's hole outlives grace, but is covered
		synctest.Wait()
		ev.expect(t, "msg a1, msg b1, msg b3, msg a3, loss")
		// The wrapped queue's loss (a reconnect) covers open holes too.
		f.deliver("items", msg("a", "a5", 5))
		f.losses["items"]()
		time.Sleep(time.Hour)
		synctest.Wait()
		ev.expect(t, "msg a1, msg b1, msg b3, msg a3, loss, msg a5, loss")
		// A hole opened afterwards is reported.
		f.deliver("items", msg("b", "b5", 5))
		time.Sleep(time.Hour)
		synctest.Wait()
		ev.expect(t, "msg a1, msg b1, msg b3, msg a3, loss, msg a5, loss, msg b5, loss")
	})
}

// Each loss is logged once, with how many messages went missing.
func TestLossIsLoggedWithTheCount(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, f, _, m := setup(t, 6)
		defer d.Close(context.Background())
		l, hook := logtest.NewNullLogger()
		d.log = l
		f.deliver("items", m[0])
		f.deliver("items", m[3]) // 2 and 3 lost
		f.deliver("items", m[4]) // 6 lost: the mark says so
		f.deliver("items", f.next(t))
		entries := hook.AllEntries()
		if len(entries) != 1 || entries[0].Level != logrus.WarnLevel ||
			!strings.HasPrefix(entries[0].Message, "3 notifications lost by the queue (found by a mark") ||
			entries[0].Data["entity"] != shared.EntityType("items") {
			for _, e := range entries {
				t.Logf("%s %s %v", e.Level, e.Message, e.Data)
			}
			t.Fatalf("%d log entries, want one warning of 3 lost notifications on items", len(entries))
		}
	})
}

// A subscription the wrapped queue refuses leaves nothing behind, and the
// detector's own refusals after Close.
func TestLossSubscribeErrors(t *testing.T) {
	d := quietDetector(NewMemory())
	if err := d.Subscribe("items", func([]byte) {}, nil); err != nil {
		t.Fatal(err)
	}
	if err := d.Subscribe("items", func([]byte) {}, nil); err != ErrAlreadySubscribed {
		t.Fatalf("second subscribe: %v, want ErrAlreadySubscribed", err)
	}
	if n := len(d.subs); n != 1 {
		t.Fatalf("%d subscriptions kept, want 1", n)
	}
	if err := d.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := d.Subscribe("users", func([]byte) {}, nil); err != ErrClosed {
		t.Fatalf("subscribe after close: %v, want ErrClosed", err)
	}
	if err := d.Close(context.Background()); err != nil {
		t.Fatalf("second close: %v", err)
	}
}

// A subscription tracks at most maxPublishers publishers, however many ids
// are forged on the broker, forgetting the least recently heard; one heard
// regularly is kept, and its losses still found. An id too long to track is
// passed on untracked and logged once.
func TestLossPublishersTrackedAreBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeBroker()
		d := quietDetector(f)
		l, hook := logtest.NewNullLogger()
		d.log = l
		defer d.Close(context.Background())
		ev := &events{}
		if err := d.Subscribe("items", ev.onMessage, ev.onLoss); err != nil {
			t.Fatal(err)
		}
		s := d.subs[0]
		msg := func(pub, id string, n uint64) []byte { return stamp(keyBody(id), len(keyBody(id))-1, pub, n) }
		alive := uint64(0)
		for i := 0; i < 5*defaultLossTiming.maxPublishers; i++ {
			if i%100 == 0 {
				alive++
				f.deliver("items", msg("alive", "a", alive))
			}
			f.deliver("items", markBody(fmt.Sprint("forged-", i), 7))
		}
		s.mu.Lock()
		peers, kept := len(s.peers), s.peers["alive"] != nil
		s.mu.Unlock()
		if peers > defaultLossTiming.maxPublishers || !kept {
			t.Fatalf("%d publishers tracked (alive among them: %v), want at most %d with alive", peers, kept, defaultLossTiming.maxPublishers)
		}
		long := strings.Repeat("x", maxPublisherID+1)
		for i := uint64(1); i <= 10; i++ {
			f.deliver("items", msg(long, "long", i*2))
			f.deliver("items", markBody(long, i*2+100))
		}
		s.mu.Lock()
		_, tracked := s.peers[long]
		s.mu.Unlock()
		if tracked {
			t.Fatal("a publisher id longer than the limit is tracked")
		}
		warned := 0
		for _, e := range hook.AllEntries() {
			if strings.Contains(e.Message, "publisher id of") {
				warned++
			}
		}
		if warned != 1 {
			t.Fatalf("%d warnings for too long publisher ids, want 1", warned)
		}
		ev.mu.Lock()
		got := len(ev.log)
		ev.mu.Unlock()
		if want := int(alive) + 10; got != want || strings.Contains(ev.String(), "loss") {
			t.Fatalf("subscriber saw %d events, want %d messages and no loss: %s", got, want, ev)
		}
		// The publisher kept still has its gaps found.
		f.deliver("items", msg("alive", "gap", alive+2))
		time.Sleep(defaultLossTiming.grace)
		synctest.Wait()
		if !strings.HasSuffix(ev.String(), "msg gap, loss") {
			t.Fatalf("subscriber saw [...%s], want a loss after alive's gap", ev.String()[max(0, len(ev.String())-40):])
		}
	})
}

// A publisher forgotten for newer ones while it has a hole open cannot have
// the hole filled any more: it is a loss once grace has passed since it
// opened, not dropped silently.
func TestLossForgottenPublishersHolesAreALossAfterGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeBroker()
		d := quietDetector(f)
		defer d.Close(context.Background())
		ev := &events{}
		if err := d.Subscribe("items", ev.onMessage, ev.onLoss); err != nil {
			t.Fatal(err)
		}
		s := d.subs[0]
		msg := func(pub, id string, n uint64) []byte { return stamp(keyBody(id), len(keyBody(id))-1, pub, n) }
		f.deliver("items", msg("a", "a1", 1))
		f.deliver("items", msg("a", "a3", 3)) // a's 2 missing
		time.Sleep(defaultLossTiming.grace / 2)
		for i := 0; i < defaultLossTiming.maxPublishers; i++ {
			f.deliver("items", markBody(fmt.Sprint("forged-", i), 7))
		}
		s.mu.Lock()
		peers, kept := len(s.peers), s.peers["a"] != nil
		s.mu.Unlock()
		if peers > defaultLossTiming.maxPublishers || kept {
			t.Fatalf("%d publishers tracked (a among them: %v), want at most %d without a", peers, kept, defaultLossTiming.maxPublishers)
		}
		f.deliver("items", msg("a", "a2", 2)) // too late: a is new again
		time.Sleep(defaultLossTiming.grace/2 - time.Millisecond)
		synctest.Wait()
		ev.expect(t, "msg a1, msg a3, msg a2")
		time.Sleep(time.Millisecond)
		synctest.Wait()
		ev.expect(t, "msg a1, msg a3, msg a2, loss")
		time.Sleep(time.Hour)
		synctest.Wait()
		ev.expect(t, "msg a1, msg a3, msg a2, loss")
	})
}

// Losses found by the detector (here: forged marks) start at most one
// resync per resyncEvery per entity type; one found sooner waits for the end
// of the window, and one resync then covers all found meanwhile. The wrapped
// queue's own losses pass at once and cover what waits.
func TestLossResyncsAreRateLimited(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeBroker()
		d := quietDetector(f)
		l, hook := logtest.NewNullLogger()
		d.log = l
		defer d.Close(context.Background())
		ev := &events{}
		if err := d.Subscribe("items", ev.onMessage, ev.onLoss); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
		forge := func(i int) { // a mark of a publisher started since: 500 lost
			f.deliver("items", markBody(publisherID(time.Now(), fmt.Sprintf("%016x", i)), 500))
		}
		every := defaultLossTiming.resyncEvery
		forge(1)
		forge(2)
		forge(3)
		ev.expect(t, "loss")
		time.Sleep(every - time.Millisecond)
		synctest.Wait()
		ev.expect(t, "loss")
		time.Sleep(time.Millisecond)
		synctest.Wait()
		ev.expect(t, "loss, loss")
		time.Sleep(time.Hour)
		synctest.Wait()
		ev.expect(t, "loss, loss")
		var counts []string
		for _, e := range hook.AllEntries() {
			counts = append(counts, strings.Fields(e.Message)[0])
		}
		if got := strings.Join(counts, " "); got != "500 1000" {
			t.Fatalf("losses logged with counts %q, want \"500 1000\"", got)
		}

		forge(4) // a window has passed: at once
		forge(5) // waits
		ev.expect(t, "loss, loss, loss")
		f.losses["items"]() // the wrapped queue's: at once, and covers 5
		ev.expect(t, "loss, loss, loss, loss")
		time.Sleep(time.Hour)
		synctest.Wait()
		ev.expect(t, "loss, loss, loss, loss")
	})
}

// stalledSetup is setup(t, 4) with a subscriber whose onMessage for message
// 4 takes hold (a slow handler, or its goroutine not run by a loaded
// machine's scheduler): until hold returns, the subscription takes no next
// message. Messages 1 and 3 are delivered, opening a hole at 2, and message
// 4 is being handled when it returns.
func stalledSetup(t *testing.T, hold func()) (*lossDetector, *fakeBroker, *events, [][]byte, <-chan struct{}) {
	t.Helper()
	d, f, ev, m := setup(t, 4)
	d.subs[0].onMessage = func(b []byte) {
		ev.onMessage(b)
		if _, n, _, _ := parseStamp(b); n == 4 {
			hold()
		}
	}
	f.deliver("items", m[0])
	f.deliver("items", m[2]) // 2 comes late, behind 4
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.deliver("items", m[3])
	}()
	synctest.Wait()
	return d, f, ev, m, done
}

// A late message waiting behind one the subscriber is slow to handle is no
// loss, though it arrives after more than grace: the grace counts from when
// the subscriber could take messages again.
func TestLossGraceWaitsForAStalledSubscriber(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		grace := defaultLossTiming.grace
		d, f, ev, m, done := stalledSetup(t, func() { time.Sleep(grace * 3 / 2) })
		defer d.Close(context.Background())
		<-done
		f.deliver("items", m[1])
		time.Sleep(time.Hour)
		synctest.Wait()
		ev.expect(t, "msg 1, msg 3, msg 4, msg 2")
	})
}

// A hole that never fills is still a loss: grace after the subscriber's
// stall ended.
func TestLossAfterAStalledSubscriberIsALossAfterGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		grace := defaultLossTiming.grace
		start := time.Now()
		d, _, ev, _, done := stalledSetup(t, func() { time.Sleep(grace * 3 / 2) })
		defer d.Close(context.Background())
		<-done // 2 never comes
		time.Sleep(grace - time.Millisecond)
		synctest.Wait()
		ev.expect(t, "msg 1, msg 3, msg 4")
		time.Sleep(time.Millisecond)
		synctest.Wait()
		ev.expect(t, "msg 1, msg 3, msg 4, loss")
		if took := time.Since(start); took != grace*5/2 {
			t.Fatalf("loss reported after %s, want %s", took, grace*5/2)
		}
	})
}

// A subscriber stuck in onMessage does not hold a loss back for ever: a hole
// is a loss maxGrace after it opened, whatever the subscriber does.
func TestLossWithAStuckSubscriberAfterMaxGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		unstick := make(chan struct{})
		start := time.Now()
		d, _, ev, _, done := stalledSetup(t, func() { <-unstick })
		defer d.Close(context.Background())
		defer func() { close(unstick); <-done }()
		limit := defaultLossTiming.maxGrace
		time.Sleep(limit - time.Millisecond)
		synctest.Wait()
		ev.expect(t, "msg 1, msg 3, msg 4")
		time.Sleep(time.Millisecond)
		synctest.Wait()
		ev.expect(t, "msg 1, msg 3, msg 4, loss")
		if took := time.Since(start); took != limit {
			t.Fatalf("loss reported after %s, want %s", took, limit)
		}
	})
}

// The grace timer running late means the process was not running (a loaded
// machine), the subscriber's goroutine included: a hole gets its grace
// again from then, so the late message the subscriber then takes is no
// loss, and one that never comes is a loss grace later.
func TestLossGraceStartsAgainAfterTheTimerRanLate(t *testing.T) {
	for _, fills := range []bool{true, false} {
		t.Run(fmt.Sprintf("filled=%v", fills), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				grace := defaultLossTiming.grace
				d, f, ev, m := setup(t, 3)
				defer d.Close(context.Background())
				s := d.subs[0]
				f.deliver("items", m[0])
				f.deliver("items", m[2])
				// The timer does not run when due, but a second late.
				s.mu.Lock()
				s.timer.Stop()
				s.mu.Unlock()
				time.Sleep(2 * grace)
				s.graceDue()
				synctest.Wait()
				ev.expect(t, "msg 1, msg 3")
				if fills {
					f.deliver("items", m[1])
					time.Sleep(time.Hour)
					synctest.Wait()
					ev.expect(t, "msg 1, msg 3, msg 2")
					return
				}
				time.Sleep(grace - time.Millisecond)
				synctest.Wait()
				ev.expect(t, "msg 1, msg 3")
				time.Sleep(time.Millisecond)
				synctest.Wait()
				ev.expect(t, "msg 1, msg 3, loss")
			})
		})
	}
}
