package esclient_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esclient"
)

// stateLog records connection states with their errors.
type stateLog struct {
	t  *testing.T
	ch chan stateEvent
}

type stateEvent struct {
	state esclient.State
	err   error
	at    time.Time
}

func newStateLog(t *testing.T) *stateLog {
	return &stateLog{t: t, ch: make(chan stateEvent, 1024)}
}

func (l *stateLog) onState(s esclient.State, err error) {
	select {
	case l.ch <- stateEvent{s, err, time.Now()}:
	default:
		l.t.Errorf("state log full")
	}
}

// await reads states until want.
func (l *stateLog) await(want esclient.State) stateEvent {
	l.t.Helper()
	deadline := time.After(wait)
	for {
		select {
		case e := <-l.ch:
			if e.state == want {
				return e
			}
		case <-deadline:
			l.t.Fatalf("state %v not reached within %s", want, wait)
			return stateEvent{}
		}
	}
}

// none checks that no state change is waiting.
func (l *stateLog) none() {
	l.t.Helper()
	select {
	case e := <-l.ch:
		l.t.Fatalf("unexpected state change to %v (%v)", e.state, e.err)
	default:
	}
}

func heartbeatWelcome(ms int) map[string]any {
	w := defaultWelcome()
	w["heartbeatMs"] = ms
	return w
}

// TestHeartbeatSilenceReconnects: a server that announced a heartbeat and
// then sends nothing (a half-open connection after a laptop sleep, a dead
// NAT entry) is given up after twice the interval plus the slack; the
// client reconnects and subscribes again.
func TestHeartbeatSilenceReconnects(t *testing.T) {
	const hb = 100 * time.Millisecond
	f := startFakeWith(t, heartbeatWelcome(int(hb/time.Millisecond)))
	log := newStateLog(t)
	c := dial(t, f.url, fast(esclient.Options{OnState: log.onState}))
	log.await(esclient.Connected)
	fc := f.accept()
	k := key("items", "1")
	r := newRecorder(t)
	r.subscribe(c, k)
	fc.ack(fc.expect("subscribe", k))
	fc.rows(k, 1, `"v1"`)
	r.expectRows(`"v1"`)
	lastFrame := time.Now() // the client read the rows frame no earlier

	// The server goes silent without closing anything.
	lost := log.await(esclient.Disconnected)
	if d := lost.at.Sub(lastFrame); d < 2*hb {
		t.Fatalf("gave up after %s of silence, before twice the heartbeat interval (%s)", d, 2*hb)
	}
	var ne interface{ Timeout() bool }
	if lost.err == nil || !strings.Contains(lost.err.Error(), "heartbeat") || !errors.As(lost.err, &ne) || !ne.Timeout() {
		t.Fatalf("disconnected with %v, want a timeout error that names the heartbeat", lost.err)
	}
	fc = f.accept()
	fc.ack(fc.expect("subscribe", k))
	fc.rows(k, 1, `"v1 again"`)
	r.expectRows(`"v1 again"`)
}

// TestHeartbeatsKeepTheConnection: heartbeat frames alone keep a connection
// alive well past the silence limit, and reach no callback.
func TestHeartbeatsKeepTheConnection(t *testing.T) {
	const hb = 100 * time.Millisecond
	f := startFakeWith(t, heartbeatWelcome(int(hb/time.Millisecond)))
	log := newStateLog(t)
	errs := make(chan error, 16)
	c := dial(t, f.url, fast(esclient.Options{OnState: log.onState, OnError: func(err error) { errs <- err }}))
	log.await(esclient.Connected)
	fc := f.accept()
	// The client's limit is 2 x 100ms + 1s of slack: beat for twice that.
	tick := time.NewTicker(hb / 2)
	defer tick.Stop()
	for end := time.Now().Add(2 * (2*hb + time.Second)); time.Now().Before(end); <-tick.C {
		fc.send(map[string]any{"type": "heartbeat"})
	}
	// The connection is still the first one: a request reaches it.
	k := key("items", "1")
	c.Subscribe(k, nil, nil)
	fc.expect("subscribe", k)
	log.none()
	select {
	case err := <-errs:
		t.Fatalf("heartbeat frames caused an error: %v", err)
	default:
	}
}
