package esclient_test

// The client against the limits a server announces in its welcome frame:
// request pacing, maxSubscriptions, and a reconnect backoff that does not
// start afresh on a connection the server drops right away.

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esclient"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

func limitsWelcome(limits map[string]any) map[string]any {
	w := defaultWelcome()
	w["limits"] = limits
	return w
}

// checkBucket fails unless the requests' arrival times fit the server's
// token bucket: by time t after the first, at most burst + rate*t of them.
// 5ms of leeway: the scripted server notes an arrival when its goroutine
// runs, which may be late (the first one, late, shrinks every gap).
// Unpaced requests arrive within a millisecond, far below the gaps checked
// (20ms and more).
func checkBucket(t *testing.T, reqs []request, rate float64, burst int) {
	t.Helper()
	for i := burst; i < len(reqs); i++ {
		minGap := time.Duration(float64(i+1-burst) / rate * float64(time.Second))
		if gap := reqs[i].at.Sub(reqs[0].at); gap < minGap-5*time.Millisecond {
			t.Fatalf("request %d arrived %s after the first; a bucket of %d at %g/s allows it after %s", i+1, gap, burst, rate, minGap)
		}
	}
}

// TestResubscribesArePaced: the subscriptions sent after a welcome that
// announces a rate limit go out as a burst and then at the announced rate,
// on the first connection and again after a reconnect.
func TestResubscribesArePaced(t *testing.T) {
	const rate, burst, n = 40.0, 5, 16
	f := startFakeWith(t, limitsWelcome(map[string]any{"maxSubscriptions": 100, "messagesPerSecond": rate, "messageBurst": burst}))
	log := newStateLog(t)
	c := dial(t, f.url, fast(esclient.Options{OnState: log.onState}))
	fc := f.accept()
	keys := make([]shared.EntityKey, n)
	for i := range keys {
		keys[i] = key("items", fmt.Sprint(i))
		c.Subscribe(keys[i], nil, nil)
	}
	reqs := make([]request, n)
	for i, k := range keys {
		reqs[i] = fc.expect("subscribe", k)
		fc.ack(reqs[i])
	}
	checkBucket(t, reqs, rate, burst)

	fc.ws.Close()
	log.await(esclient.Disconnected)
	fc = f.accept()
	for i, k := range keys { // oldest first
		reqs[i] = fc.expect("subscribe", k)
	}
	checkBucket(t, reqs, rate, burst)
}

// TestMaxSubscriptionsIsNotExceeded: the client sends no more subscribes
// than the server's maxSubscriptions allows; the excess is reported to its
// subscriptions as too_many_subscriptions without being sent, and after a
// reconnect to a server with a lower limit the oldest keys are kept.
func TestMaxSubscriptionsIsNotExceeded(t *testing.T) {
	f := startFakeWith(t, limitsWelcome(map[string]any{"maxSubscriptions": 3}))
	log := newStateLog(t)
	c := dial(t, f.url, fast(esclient.Options{OnState: log.onState}))
	fc := f.accept()
	recs := make([]*recorder, 5)
	unsubs := make([]func(), 5)
	for i := range recs {
		recs[i] = newRecorder(t)
		unsubs[i] = recs[i].subscribe(c, key("items", fmt.Sprint(i)))
	}
	for i := range 3 {
		fc.ack(fc.expect("subscribe", key("items", fmt.Sprint(i))))
	}
	for i := 3; i < 5; i++ {
		serr := asServerError(t, recs[i].expectKind("error").err)
		if serr.Code != shared.CodeTooManySubscriptions || serr.Key != key("items", fmt.Sprint(i)) || serr.Action != shared.ActionSubscribe {
			t.Fatalf("key %d: got %+v", i, serr)
		}
	}
	// Room again after an unsubscribe; the refused keys were never sent.
	unsubs[0]()
	fc.ack(fc.expect("unsubscribe", key("items", "0")))
	fence := key("items", "fence")
	rf := newRecorder(t)
	rf.subscribe(c, fence)
	fc.ack(fc.expect("subscribe", fence))

	// Holding 1, 2 and the fence, the client meets a server that allows 2.
	f.setWelcome(limitsWelcome(map[string]any{"maxSubscriptions": 2}))
	fc.ws.Close()
	log.await(esclient.Disconnected)
	fc = f.accept()
	fc.ack(fc.expect("subscribe", key("items", "1")))
	fc.ack(fc.expect("subscribe", key("items", "2")))
	serr := asServerError(t, rf.expectKind("error").err)
	if serr.Code != shared.CodeTooManySubscriptions || serr.Key != fence {
		t.Fatalf("the fence: got %+v", serr)
	}
	unsubs[1]()
	fc.expect("unsubscribe", key("items", "1")) // and no subscribe of the fence before it
	for _, r := range append(recs, rf) {
		r.none()
	}
}

// TestBackoffGrowsWhenServerDropsRightAfterWelcome: a server that welcomes
// the client and drops it at once, even after acking its resubscription
// and sending the rows (as a server whose next frame the client cannot read
// does), does not reset the reconnect backoff, so the client backs off
// further each time instead of looping at the first delay; a connection
// that stayed open Options.HealthyAfter resets it.
func TestBackoffGrowsWhenServerDropsRightAfterWelcome(t *testing.T) {
	f := startFake(t)
	const healthyAfter = 300 * time.Millisecond
	opts := esclient.WithMaxJitter(esclient.Options{MinBackoff: 20 * time.Millisecond, MaxBackoff: 640 * time.Millisecond, HealthyAfter: healthyAfter})
	c := dial(t, f.url, opts)
	k := key("items", "1")
	rec := newRecorder(t)
	rec.subscribe(c, k)
	fc := f.accept()
	req := fc.expect("subscribe", k)
	for i, ceil := range []time.Duration{20, 40, 80, 160, 320, 640, 640} {
		ceil *= time.Millisecond
		prev := fc
		if i%2 == 1 {
			// Answered, and the client has taken the rows before it sees
			// the connection end.
			row := fmt.Sprintf(`"v%d"`, i)
			prev.ack(req)
			prev.rows(k, 1, row)
			rec.expectRows(row)
		}
		prev.ws.Close() // dropped right after welcome (or the ack)
		fc = f.accept()
		if gap := fc.at.Sub(prev.at); gap < ceil {
			t.Fatalf("reconnected %s after a connection dropped right after welcome; the backoff ceiling should have grown to %s", gap, ceil)
		}
		req = fc.expect("subscribe", k)
	}
	// This connection stays open healthyAfter, so it proved healthy: the
	// next reconnect waits the first ceiling (20ms) again, not 640ms.
	// Waiting out healthyAfter is what is tested, so it is a timer, not an
	// event; the client took its welcome before it sent req.
	fc.ack(req)
	time.Sleep(healthyAfter + 5*time.Millisecond - time.Since(req.at))
	cut := time.Now()
	fc.ws.Close()
	fc = f.accept()
	if gap := fc.at.Sub(cut); gap >= 320*time.Millisecond {
		t.Fatalf("reconnected %s after a connection that stayed open %s ended: the backoff was not reset", gap, healthyAfter)
	}
	fc.expect("subscribe", k)
}

// TestManyKeysReconnectCleanly: a client holding more keys than the
// server's default burst (100) subscribes them all and, after a cut,
// resubscribes them all, without a single rate_limited refusal and without
// being dropped, and ends on the state changed while it was away.
func TestManyKeysReconnectCleanly(t *testing.T) {
	const n = 130
	store := testkit.NewStore()
	e, srv := testkit.Serve(t, entitysync.Config{Logger: testkit.Logger()}) // default limits: 50/s, burst 100
	if err := e.Register("items", store.Fetch); err != nil {
		t.Fatal(err)
	}
	p := startProxy(t, srv.Listener.Addr().String())
	log := newStateLog(t)
	var errCount atomic.Int64
	errs := make(chan error, 1) // the first error
	c := dial(t, "ws://"+p.Addr()+shared.WebsocketPath, fast(esclient.Options{
		OnState: log.onState,
		OnError: func(err error) {
			errCount.Add(1)
			select {
			case errs <- err:
			default:
			}
		},
	}))
	log.await(esclient.Connected)
	recs := make([]*recorder, n)
	for i := range recs {
		recs[i] = newRecorder(t)
		recs[i].subscribe(c, key("items", fmt.Sprint(i)))
	}
	for _, r := range recs {
		r.await(0)
	}

	p.SetDown(true)
	p.Cut()
	log.await(esclient.Disconnected)
	versions := make([]int, n)
	for i := range versions {
		versions[i] = store.Bump(key("items", fmt.Sprint(i))) // while away
	}
	p.SetDown(false)
	log.await(esclient.Connected)
	for i, r := range recs {
		r.await(versions[i])
	}
	// Every rate_limited refusal of a subscribe is reported to OnError.
	if n := errCount.Load(); n > 0 {
		t.Fatalf("%d errors, the first: %v", n, <-errs)
	}
	log.none() // connected once, never dropped
}

// TestRequestWindow: at most 32 requests await an answer at a time. The
// server drops (1008) a connection whose unwritten answers pile up past 64,
// less than its default burst of 100, so a full burst to a busy server
// could otherwise get a client dropped although it reads everything.
func TestRequestWindow(t *testing.T) {
	f := startFake(t) // no rate limit: only the window holds requests back
	c := dial(t, f.url, esclient.Options{})
	fc := f.accept()
	keys := make([]shared.EntityKey, 40)
	for i := range keys {
		keys[i] = key("items", fmt.Sprint(i))
		c.Subscribe(keys[i], nil, nil)
	}
	reqs := make([]request, len(keys))
	for i := range 32 {
		reqs[i] = fc.expect("subscribe", keys[i])
	}
	// Each further request is sent only once an earlier one was answered.
	for i := 32; i < len(keys); i++ {
		answered := time.Now()
		fc.ack(reqs[i-32])
		reqs[i] = fc.expect("subscribe", keys[i])
		if reqs[i].at.Before(answered) {
			t.Fatalf("request %d arrived before an answer freed a place for it", i+1)
		}
	}
}

// TestRateWithoutBurstIsPaced: a welcome that announces a rate but no burst
// gets requests one at a time at that rate, not all at once.
func TestRateWithoutBurstIsPaced(t *testing.T) {
	const rate = 50.0
	f := startFakeWith(t, limitsWelcome(map[string]any{"messagesPerSecond": rate}))
	c := dial(t, f.url, esclient.Options{})
	fc := f.accept()
	reqs := make([]request, 6)
	for i := range reqs {
		c.Subscribe(key("items", fmt.Sprint(i)), nil, nil)
	}
	for i := range reqs {
		reqs[i] = fc.expect("subscribe", key("items", fmt.Sprint(i)))
		fc.ack(reqs[i])
	}
	checkBucket(t, reqs, rate, 1)
}
