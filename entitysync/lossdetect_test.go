package entitysync_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// gateQueue stalls its subscriber while the gate is shut, as a paused or
// saturated server does: the first message that arrives then waits in the
// consumer, and nsqd keeps the rest.
type gateQueue struct {
	esq.Queue
	mu      sync.Mutex
	shut    chan struct{} // nil when open
	stalled chan struct{} // closed when a message waits at the gate
}

func (g *gateQueue) Subscribe(entity shared.EntityType, onMessage func([]byte), onLoss func()) error {
	return g.Queue.Subscribe(entity, func(b []byte) {
		g.mu.Lock()
		shut, stalled := g.shut, g.stalled
		g.mu.Unlock()
		if shut != nil {
			select {
			case <-stalled:
			default:
				close(stalled)
			}
			<-shut
		}
		onMessage(b)
	}, onLoss)
}

func (g *gateQueue) close() (stalled chan struct{}) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.shut, g.stalled = make(chan struct{}), make(chan struct{})
	return g.stalled
}

func (g *gateQueue) open() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.shut != nil {
		close(g.shut)
		g.shut = nil
	}
}

type channelStats struct {
	Depth        int64 `json:"depth"`
	MessageCount int64 `json:"message_count"`
}

// nsqdChannel reads a channel's counters from nsqd's HTTP stats.
func nsqdChannel(httpAddr, topic, channel string) (channelStats, error) {
	resp, err := http.Get("http://" + httpAddr + "/stats?format=json&topic=" + url.QueryEscape(topic) + "&channel=" + url.QueryEscape(channel))
	if err != nil {
		return channelStats{}, err
	}
	defer resp.Body.Close()
	var body struct {
		Topics []struct {
			Name     string `json:"topic_name"`
			Depth    int64  `json:"depth"`
			Channels []struct {
				Name string `json:"channel_name"`
				channelStats
			} `json:"channels"`
		} `json:"topics"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return channelStats{}, err
	}
	for _, tp := range body.Topics {
		for _, c := range tp.Channels {
			if tp.Name == topic && c.Name == channel {
				if tp.Depth != 0 {
					return channelStats{}, fmt.Errorf("topic %s still holds %d messages", topic, tp.Depth)
				}
				return c.channelStats, nil
			}
		}
	}
	return channelStats{}, fmt.Errorf("no channel %s on topic %s", channel, topic)
}

// A server stalls while changes are published faster than its ephemeral
// channel holds them (--mem-queue-size 10 here): nsqd drops the overflow,
// including the last change of a key, and nothing disconnects. The server
// notices the loss through the publisher's sequence numbers and resyncs, so
// its client ends with the final state.
func TestServerWhoseNSQChannelOverflowsConverges(t *testing.T) {
	const memQueue, fillers = 10, 300
	nsqd := nsqtest.StartNSQDWith(t, nsqtest.Options{MemQueueSize: memQueue})
	store := testkit.NewStore()
	logger := testkit.Logger()

	a, _ := testkit.Serve(t, es.Config{NSQAddr: nsqd.TCPAddr(), Logger: logger})
	nq, err := esq.NewNSQ(esq.NSQConfig{NSQDAddrs: []string{nsqd.TCPAddr()}, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	gate := &gateQueue{Queue: nq}
	b, bsrv := testkit.Serve(t, es.Config{Queue: gate, Logger: logger})
	for _, e := range []*es.EntitySync{a, b} {
		if err := e.Register("items", store.Fetch); err != nil {
			t.Fatal(err)
		}
	}

	tail := key("items", "tail")
	progress := testkit.NewProgress()
	client := testkit.DialTracker(t, bsrv, testkit.TrackerOptions{Progress: progress})
	if client == nil {
		t.FailNow()
	}
	if err := client.Subscribe(tail); err != nil {
		t.Fatal(err)
	}
	progress.Await(t, wait, func() (bool, string) {
		_, ok := client.Latest(tail)
		return ok, "initial state of " + tail.String()
	})

	// Stall server b on the next message, then overflow its channel.
	stalled := gate.close()
	t.Cleanup(gate.open) // if the test fails before it opens: b must close
	if err := a.NotifyAllOfChange(key("items", "filler")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-stalled:
	case <-time.After(wait):
		t.Fatal("server b did not receive the first message")
	}
	for i := 0; i < fillers; i++ {
		if err := a.NotifyAllOfChange(key("items", fmt.Sprint("filler-", i))); err != nil {
			t.Fatal(err)
		}
	}
	final := store.Bump(tail)
	if err := a.NotifyAllOfChange(tail); err != nil {
		t.Fatal(err)
	}
	// nsqd has put every message, the tail's last, into b's channel, and
	// the channel was full: the tail's notification is gone.
	testkit.AwaitCond(t, wait, func() (bool, string) {
		st, err := nsqdChannel(nsqd.HTTPAddr(), "items", nq.Channel())
		if err != nil {
			return false, err.Error()
		}
		if st.Depth != memQueue || st.MessageCount < fillers+2 {
			return false, fmt.Sprintf("channel depth %d, %d messages put, want depth %d and %d put", st.Depth, st.MessageCount, memQueue, fillers+2)
		}
		return true, ""
	})
	gate.open()

	progress.Await(t, wait, func() (bool, string) {
		v, _ := client.Latest(tail)
		return v == final, fmt.Sprintf("client has %s at v%d, want v%d", tail, v, final)
	})
	st := b.Bridge.Stats()
	if st.Resyncs == 0 {
		t.Fatal("converged without a resync: the tail's notification was not lost")
	}
	if st.Received > fillers {
		t.Fatalf("server b received %d notifications of %d: nsqd dropped nothing", st.Received, fillers+2)
	}
	t.Logf("server b received %d of %d notifications, resynced %d time(s), and its client has %s at v%d",
		st.Received, fillers+2, st.Resyncs, tail, final)
}

// recordQueue is an in-process queue that records what is published.
type recordQueue struct {
	*esq.Memory
	mu   sync.Mutex
	sent []string
}

func (r *recordQueue) Publish(ctx context.Context, entity shared.EntityType, body []byte) error {
	r.mu.Lock()
	r.sent = append(r.sent, string(body))
	r.mu.Unlock()
	return r.Memory.Publish(ctx, entity, body)
}

// Loss detection is on for a queue given in Config.Queue too, and
// DisableLossDetection turns it off: the message is then the plain key.
func TestLossDetectionWrapsEveryQueueUnlessDisabled(t *testing.T) {
	for _, disable := range []bool{false, true} {
		q := &recordQueue{Memory: esq.NewMemory()}
		e, err := es.New(es.Config{Queue: q, DisableLossDetection: disable, Logger: testkit.Logger()})
		if err != nil {
			t.Fatal(err)
		}
		if err := e.NotifyAllOfChange(key("items", "1")); err != nil {
			t.Fatal(err)
		}
		closeES(t, e)
		q.mu.Lock()
		got := q.sent[0]
		q.mu.Unlock()
		stamped := strings.HasPrefix(got, `{"entity":"items","id":"1","_es":{"p":"`)
		if stamped == disable || (disable && got != `{"entity":"items","id":"1"}`) {
			t.Errorf("DisableLossDetection %v: published %s", disable, got)
		}
	}
}
