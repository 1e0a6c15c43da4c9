package esq_test

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
)

func TestNSQPublishAfterSubscribeArrives(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	lg := logrus.New()
	lg.SetLevel(logrus.DebugLevel)
	q, err := esq.NewNSQ(esq.NSQConfig{NSQDAddrs: []string{nsqd.TCPAddr()}, Logger: lg})
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 10)
	if err := q.Subscribe("items", func(b []byte) { got <- string(b) }, nil); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := q.Publish(context.Background(), "items", []byte(`{"entity":"items","id":"1"}`)); err != nil {
			t.Fatal(err)
		}
		select {
		case <-got:
		case <-time.After(3 * time.Second):
			t.Fatalf("message %d not received", i)
		}
	}
	q.Close(context.Background())
}

// Two applications share one nsqd through topic prefixes: each receives only
// its own notifications, and the topic on nsqd carries the prefix.
func TestNSQTopicPrefixSeparatesApplications(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	got := map[string]chan string{"a.": make(chan string, 10), "b.": make(chan string, 10)}
	queues := map[string]*esq.NSQ{}
	for prefix, ch := range got {
		q, err := esq.NewNSQ(esq.NSQConfig{NSQDAddrs: []string{nsqd.TCPAddr()}, TopicPrefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { q.Close(context.Background()) })
		if err := q.Subscribe("items", func(b []byte) { ch <- string(b) }, nil); err != nil {
			t.Fatal(err)
		}
		queues[prefix] = q
	}
	if err := queues["a."].Publish(context.Background(), "items", []byte(`{"id":"from-a"}`)); err != nil {
		t.Fatal(err)
	}
	if err := queues["b."].Publish(context.Background(), "items", []byte(`{"id":"from-b"}`)); err != nil {
		t.Fatal(err)
	}
	for prefix, want := range map[string]string{"a.": `{"id":"from-a"}`, "b.": `{"id":"from-b"}`} {
		select {
		case b := <-got[prefix]:
			if b != want {
				t.Errorf("prefix %s received %s, want %s", prefix, b, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("prefix %s received nothing", prefix)
		}
	}
	resp, err := http.Get("http://" + nsqd.HTTPAddr() + "/stats?format=json&topic=a.items")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if !strings.Contains(string(body), `"topic_name":"a.items"`) {
		t.Errorf("nsqd has no topic a.items: %s", body)
	}
}
