package esq

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/entity-sync/entity-sync/internal/nsqtest"
)

// startConsumer subscribes a consumer to topic on nsqd (the topic is created
// first, by a publish, so the SUB finds it) and stops it at the end.
func startConsumer(t *testing.T, nsqd *nsqtest.NSQD, topic string, maxInFlight int, heartbeat time.Duration, handle func([]byte)) *nsqConsumer {
	t.Helper()
	c := newNSQConsumer(topic, "test#ephemeral", maxInFlight, 200*time.Millisecond,
		func() ([]string, error) { return []string{nsqd.TCPAddr()}, nil }, handle, silentLogger())
	c.heartbeat = heartbeat
	if err := c.start(true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.stop)
	return c
}

// channelStats returns what nsqd's /stats says of the test channel.
func channelStats(t *testing.T, nsqd *nsqtest.NSQD, topic string) (inFlight, finished int) {
	t.Helper()
	resp, err := http.Get("http://" + nsqd.HTTPAddr() + "/stats?format=json&topic=" + topic)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var stats struct {
		Topics []struct {
			Channels []struct {
				Name     string `json:"channel_name"`
				InFlight int    `json:"in_flight_count"`
				Clients  []struct {
					Finished int `json:"finish_count"`
				} `json:"clients"`
			} `json:"channels"`
		} `json:"topics"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&stats); err != nil {
		t.Fatal(err)
	}
	for _, tp := range stats.Topics {
		for _, ch := range tp.Channels {
			if ch.Name == "test#ephemeral" {
				for _, c := range ch.Clients {
					finished += c.Finished
				}
				return ch.InFlight, finished
			}
		}
	}
	t.Fatalf("nsqd has no channel test#ephemeral on topic %s", topic)
	return 0, 0
}

func publishN(t *testing.T, nsqd *nsqtest.NSQD, topic string, n int) {
	t.Helper()
	p := newProducer(nsqd.TCPAddr(), silentLogger())
	defer p.Stop(context.Background())
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.publish(context.Background(), topic, fmt.Appendf(nil, `{"n":%d}`, i), true); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// Acknowledgements go in batches, and a batch smaller than half of
// MaxInFlight goes out after finDelay: a burst many times MaxInFlight
// arrives whole (nsqd stops sending while MaxInFlight messages are
// unacknowledged), and once it has, nsqd holds no message in flight.
func TestNSQConsumerAcknowledgesEveryMessage(t *testing.T) {
	const topic, maxInFlight, published = "acks", 8, 1000
	nsqd := nsqtest.StartNSQD(t)
	publishN(t, nsqd, topic, 1) // creates the topic
	got := make(chan struct{}, published+1)
	startConsumer(t, nsqd, topic, maxInFlight, nsqHeartbeat, func([]byte) { got <- struct{}{} })
	publishN(t, nsqd, topic, published)
	for i := 0; i < published; i++ {
		select {
		case <-got:
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of %d messages arrived with MaxInFlight %d", i, published, maxInFlight)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		inFlight, finished := channelStats(t, nsqd, topic)
		if inFlight == 0 && finished >= published {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nsqd still has %d messages in flight (%d finished) 5s after the last arrived", inFlight, finished)
		}
		time.Sleep(20 * time.Millisecond) // polling nsqd's counters: nothing to wait on
	}
}

// The consumer answers nsqd's heartbeats: nsqd closes a connection that
// stays silent for two heartbeat intervals, so an idle consumer that did
// not answer would lose its subscription every two intervals.
func TestNSQConsumerAnswersHeartbeats(t *testing.T) {
	const topic = "heartbeats"
	nsqd := nsqtest.StartNSQD(t)
	publishN(t, nsqd, topic, 1)
	got := make(chan []byte, 4)
	c := startConsumer(t, nsqd, topic, 4, time.Second, func(b []byte) { got <- b }) // nsqd's smallest heartbeat interval
	<-got                                                                           // the message that created the topic
	// Idle for three heartbeat intervals: a silent client is dropped by
	// nsqd after two.
	time.Sleep(3500 * time.Millisecond)
	if n, closes := c.connections(), c.closes.Load(); n != 1 || closes != 0 {
		t.Fatalf("after 3.5s idle: %d connections, %d lost; want 1 and 0", n, closes)
	}
	publishN(t, nsqd, topic, 1)
	select {
	case b := <-got:
		if string(b) != `{"n":0}` {
			t.Fatalf("got %s", b)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("message published after the idle time did not arrive")
	}
}

func silentLogger() *logrus.Logger {
	l, _ := logtest.NewNullLogger()
	return l
}
