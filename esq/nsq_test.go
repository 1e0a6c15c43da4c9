package esq_test

import (
	"context"
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
