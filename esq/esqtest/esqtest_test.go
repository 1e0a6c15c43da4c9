package esqtest_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esq/esqtest"
	"github.com/entity-sync/entity-sync/shared"
)

// The suite is itself tested on a fake broker: correct, it passes; with
// one promise broken at a time, it fails and says why. Each broken variant
// runs in a child process (the suite fails the *testing.T it is given).

const modeEnv = "ESQTEST_FAKE_MODE"

// modes maps each way to break the fake to the text its failure must show.
var modes = map[string]string{
	"loadbalance": "load-balance instead of broadcasting",
	"silentloss":  "the loss callback was never called: silent loss",
	"earlyloss":   "it was called before delivery was live again",
	"notlive":     "Subscribe returned before delivery was live",
	"leak":        "goroutines started by the queue still run",
	"crosstalk":   "messages it did not subscribe to",
	"lateclose":   "callbacks ran after Close returned",
}

func TestFakeBroker(t *testing.T) {
	mode := os.Getenv(modeEnv)
	h := &hub{mode: mode, subs: make(map[shared.EntityType][]*fakeSub)}
	esqtest.Run(t, esqtest.Factory{
		NewQueue: func(testing.TB) esq.Queue { return &fakeQueue{h: h, subs: make(map[shared.EntityType]*fakeSub)} },
		Broker:   esqtest.BrokerFuncs{StopFunc: h.stop, StartFunc: h.start},
	}, esqtest.Features{Timeout: 500 * time.Millisecond, MaxPayload: 100, InvalidEntities: []shared.EntityType{""}})
}

func TestSuiteCatchesBrokenQueues(t *testing.T) {
	if os.Getenv(modeEnv) != "" {
		t.Skip("in a child process")
	}
	for mode, want := range modes {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(os.Args[0], "-test.run=^TestFakeBroker$", "-test.v")
			cmd.Env = append(os.Environ(), modeEnv+"="+mode)
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("the suite passed a queue broken by %q:\n%s", mode, out)
			}
			if !strings.Contains(string(out), want) {
				t.Fatalf("the suite failed a queue broken by %q without saying %q:\n%s", mode, want, out)
			}
		})
	}
}

// hub is the fake broker: it delivers synchronously to every subscription
// of an entity type. While stopped, publishes are accepted and dropped.
type hub struct {
	mode string

	mu   sync.RWMutex
	down bool
	subs map[shared.EntityType][]*fakeSub
	rr   int // round robin, for "loadbalance"
}

type fakeSub struct {
	onMessage func([]byte)
	onLoss    func()
}

func (h *hub) stop() error {
	h.mu.Lock()
	h.down = true
	subs := h.all()
	h.mu.Unlock()
	if h.mode == "earlyloss" {
		for _, s := range subs {
			if s.onLoss != nil {
				s.onLoss()
			}
		}
	}
	return nil
}

func (h *hub) start() error {
	h.mu.Lock()
	h.down = false
	subs := h.all()
	h.mu.Unlock()
	if h.mode != "silentloss" && h.mode != "earlyloss" {
		for _, s := range subs {
			if s.onLoss != nil {
				s.onLoss()
			}
		}
	}
	return nil
}

func (h *hub) all() []*fakeSub {
	var out []*fakeSub
	for _, ss := range h.subs {
		out = append(out, ss...)
	}
	return out
}

type fakeQueue struct {
	h      *hub
	mu     sync.Mutex
	closed bool
	subs   map[shared.EntityType]*fakeSub
}

func (q *fakeQueue) Publish(_ context.Context, entity shared.EntityType, body []byte) error {
	q.mu.Lock()
	closed := q.closed
	q.mu.Unlock()
	switch {
	case closed:
		return esq.ErrClosed
	case entity == "":
		return errors.New("fake: empty entity type")
	case len(body) > 100:
		return errors.New("fake: body over 100 bytes")
	}
	h := q.h
	h.mu.Lock() // a write lock: round robin state
	defer h.mu.Unlock()
	if h.down {
		return nil
	}
	subs := h.subs[entity]
	if h.mode == "crosstalk" && entity != "iso_items" && strings.HasPrefix(string(entity), "iso_items") {
		subs = append(subs[:len(subs):len(subs)], h.subs["iso_items"]...) // as a pattern "iso_items*" would
	}
	if h.mode == "loadbalance" && len(subs) > 1 {
		h.rr++
		subs = subs[h.rr%len(subs) : h.rr%len(subs)+1]
	}
	for _, s := range subs {
		s.onMessage(body)
	}
	return nil
}

func (q *fakeQueue) Subscribe(entity shared.EntityType, onMessage func([]byte), onLoss func()) error {
	if entity == "" {
		return errors.New("fake: empty entity type")
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	switch {
	case q.closed:
		return esq.ErrClosed
	case q.subs[entity] != nil:
		return esq.ErrAlreadySubscribed
	}
	s := &fakeSub{onMessage: onMessage, onLoss: onLoss}
	q.subs[entity] = s
	register := func() {
		q.h.mu.Lock()
		q.h.subs[entity] = append(q.h.subs[entity], s)
		q.h.mu.Unlock()
	}
	switch q.h.mode {
	case "notlive":
		time.AfterFunc(100*time.Millisecond, register)
	case "leak":
		register()
		go func() { select {} }()
	default:
		register()
	}
	return nil
}

func (q *fakeQueue) Close(context.Context) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil
	}
	q.closed = true
	if q.h.mode == "lateclose" {
		return nil // subscriptions stay with the broker
	}
	q.h.mu.Lock()
	defer q.h.mu.Unlock()
	for e, s := range q.subs {
		ss := q.h.subs[e]
		for i, x := range ss {
			if x == s {
				q.h.subs[e] = append(ss[:i:i], ss[i+1:]...)
				break
			}
		}
	}
	return nil
}
