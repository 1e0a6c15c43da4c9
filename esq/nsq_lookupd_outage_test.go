package esq_test

import (
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
)

// TestNSQReconnectsToRestartedNSQDWhileLookupdIsDown is a regression test
// from the soak run (soak/, `make soak`): with LookupdHTTPAddrs set, the
// consumer (go-nsq's, then) reconnected to a lost nsqd only through
// nsqlookupd. An nsqd that restarted while nsqlookupd was unreachable left
// the server deaf to everything published to it until nsqlookupd answered
// again and listed the nsqd (after a real nsqlookupd restart, up to 15 s
// more while nsqd registers again): in the soak, a server that never went
// down received no notification for about 30 s and its clients stayed
// stale until a resync.
// The nsqd's address is in NSQDAddrs, so the queue could reconnect to it
// directly, as it does without nsqlookupd.
// The watcher now also dials NSQDAddrs directly.
func TestNSQReconnectsToRestartedNSQDWhileLookupdIsDown(t *testing.T) {
	lookupd := nsqtest.StartLookupd(t)
	// The consumer reaches nsqlookupd's HTTP port through a proxy that can
	// go down with every connection: an in-process nsqlookupd's Exit keeps
	// serving keep-alive connections, which a real outage does not.
	proxy := testkit.StartProxy(t, lookupd.HTTPAddr())

	nsqd := nsqtest.StartNSQD(t, lookupd.TCPAddr())
	cfg := fastCfg(nsqd.TCPAddr())
	cfg.LookupdHTTPAddrs = []string{proxy.Addr()}
	q := newNSQ(t, cfg)
	rec := newRecorder()
	if err := q.Subscribe("items", rec.onMessage, rec.onLoss); err != nil {
		t.Fatal(err)
	}
	publish(t, q, `{"n":"before"}`)
	rec.awaitMessage(t, `{"n":"before"}`)

	// nsqlookupd becomes unreachable, then nsqd restarts (both happened
	// together in the soak run; either alone is handled).
	proxy.Close()
	if err := nsqd.Restart(); err != nil {
		t.Fatal(err)
	}
	// The restart lost what nsqd held: onLoss must say so once the
	// subscription is live again, and what is published next must arrive.
	// ReconnectInterval is 200ms: resyncWait (15 s) is 75 reconnect
	// intervals.
	rec.awaitLoss(t)
	publish(t, q, `{"n":"after restart"}`)
	rec.awaitMessage(t, `{"n":"after restart"}`)
}

// TestNSQLossWithinOneWatchTickIsReported: with nsqlookupd, the consumer
// reconnects as soon as nsqlookupd lists the restarted nsqd again, which
// can be between two ticks of the watcher: the count of connections is
// then unchanged, but the restart lost what nsqd held, so onLoss must be
// called. (A candidate cause of the soak's one-version-behind failure.)
func TestNSQLossWithinOneWatchTickIsReported(t *testing.T) {
	lookupd := nsqtest.StartLookupd(t)
	nsqd := nsqtest.StartNSQD(t, lookupd.TCPAddr())
	cfg := fastCfg(nsqd.TCPAddr())
	cfg.LookupdHTTPAddrs = []string{lookupd.HTTPAddr()}
	cfg.ReconnectInterval, cfg.WatchInterval = 10*time.Second, 3*time.Second
	q := newNSQ(t, cfg)
	rec := newRecorder()
	if err := q.Subscribe("items", rec.onMessage, rec.onLoss); err != nil {
		t.Fatal(err)
	}
	publish(t, q, `{"n":"before"}`)
	rec.awaitMessage(t, `{"n":"before"}`)
	if err := nsqd.Restart(); err != nil {
		t.Fatal(err)
	}
	rec.awaitLoss(t)
	publish(t, q, `{"n":"after restart"}`)
	rec.awaitMessage(t, `{"n":"after restart"}`)
}
