//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

// traceDepth is how many events a server keeps per key.
const traceDepth = 16

// keyTrace records the last events a soak server saw for each key (the
// notifications its queue carried, its fetches and rounds) and every loss
// its queue reported, so that a key that did not converge can be followed
// through each server after the run. Bounded: traceDepth events per key.
type keyTrace struct {
	mu     sync.Mutex
	events map[string][]string
	losses []string
	marks  map[string]string // last mark per publisher
}

func newKeyTrace() *keyTrace {
	return &keyTrace{events: map[string][]string{}, marks: map[string]string{}}
}

// clock is the time of an event as the traces print it.
func clock() string { return time.Now().UTC().Format("15:04:05.000") }

func (t *keyTrace) add(id, format string, args ...any) {
	e := clock() + " " + fmt.Sprintf(format, args...)
	t.mu.Lock()
	defer t.mu.Unlock()
	l := append(t.events[id], e)
	if len(l) > traceDepth {
		l = l[len(l)-traceDepth:]
	}
	t.events[id] = l
}

// message is a queue message as it travels (loss detection's stamp below
// the key; a mark has no key).
type message struct {
	ID    string `json:"id"`
	Stamp *struct {
		P string `json:"p"`
		N uint64 `json:"n"`
	} `json:"_es"`
}

func describe(body []byte) (id, what string) {
	var m message
	if err := json.Unmarshal(body, &m); err != nil {
		return "", fmt.Sprintf("unreadable %q", body)
	}
	if m.Stamp == nil {
		return m.ID, "unstamped"
	}
	return m.ID, fmt.Sprintf("p=%s n=%d", m.Stamp.P, m.Stamp.N)
}

// tracedQueue records what passes through a queue into a keyTrace. It sits
// below loss detection, so it sees stamps and marks.
type tracedQueue struct {
	esq.Queue
	t *keyTrace
}

func (q tracedQueue) Publish(ctx context.Context, entity shared.EntityType, body []byte) error {
	err := q.Queue.Publish(ctx, entity, body)
	if id, what := describe(body); id != "" {
		q.t.add(id, "published %s err=%v", what, err)
	}
	return err
}

func (q tracedQueue) Subscribe(entity shared.EntityType, onMessage func([]byte), onLoss func()) error {
	return q.Queue.Subscribe(entity, func(body []byte) {
		id, what := describe(body)
		if id == "" {
			q.t.mu.Lock()
			q.t.marks[what] = clock()
			q.t.mu.Unlock()
		} else {
			q.t.add(id, "received %s", what)
		}
		onMessage(body)
	}, func() {
		q.t.mu.Lock()
		q.t.losses = append(q.t.losses, clock())
		if len(q.t.losses) > traceDepth {
			q.t.losses = q.t.losses[1:]
		}
		q.t.mu.Unlock()
		if onLoss != nil {
			onLoss()
		}
	})
}

// onRound records a bridge round.
func (t *keyTrace) onRound(r esbridge.Round) {
	ms := func(x time.Time) string {
		if x.IsZero() {
			return "-"
		}
		return x.UTC().Format("05.000")
	}
	t.add(r.Key.ID, "round notified=%s started=%s fetched=%s delivered=%s fetches=%d errors=%d deliveries=%d",
		ms(r.Notified), ms(r.Started), ms(r.Fetched), ms(r.Delivered), r.Fetches, r.FetchErrors, r.Deliveries)
}

// traceReport is a server's /trace answer for one key.
type traceReport struct {
	Events []string          `json:"events"`
	Losses []string          `json:"losses"`
	Marks  map[string]string `json:"marks"`
}

func (t *keyTrace) serveHTTP(w http.ResponseWriter, r *http.Request) {
	t.mu.Lock()
	rep := traceReport{Events: append([]string(nil), t.events[r.URL.Query().Get("id")]...),
		Losses: append([]string(nil), t.losses...), Marks: map[string]string{}}
	for k, v := range t.marks {
		rep.Marks[k] = v
	}
	t.mu.Unlock()
	writeJSON(w, rep)
}
