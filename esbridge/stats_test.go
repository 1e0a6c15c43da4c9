package esbridge_test

import (
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/shared"
)

// The counters esmetrics exports beside the older ones: subscriptions in the
// index, bytes waiting in outbound queues, and updates replaced there by a
// newer state (latest-wins).
func TestStatsCountSubscriptionsPendingBytesAndCoalescedUpdates(t *testing.T) {
	f := newVersions()
	rounds := make(chan esbridge.Round, 16)
	b := newUnitBridge(t, f, esbridge.Options{OnRound: func(r esbridge.Round) { rounds <- r }})
	awaitRounds := func(keys ...shared.EntityKey) {
		t.Helper()
		want := map[shared.EntityKey]bool{}
		for _, k := range keys {
			want[k] = true
		}
		timeout := time.After(unitWait)
		for len(want) > 0 {
			select {
			case r := <-rounds:
				delete(want, r.Key)
			case <-timeout:
				t.Fatalf("no round of %v", want)
			}
		}
	}
	k2 := shared.EntityKey{Entity: "items", ID: "2"}
	// Clients that never Take: what the bridge hands them stays queued, as
	// for a websocket client whose socket is full.
	c1, c2 := b.ClientBuilder(nil), b.ClientBuilder(nil)
	for _, sub := range []struct {
		c   *esbridge.Client
		key shared.EntityKey
	}{{c1, k1}, {c1, k2}, {c2, k1}} {
		if err := sub.c.Subscribe(sub.key); err != nil {
			t.Fatal(err)
		}
	}
	awaitRounds(k1, k2)
	st := b.Stats()
	if st.Subscriptions != 3 || st.Keys != 2 || st.Clients != 2 {
		t.Fatalf("after 3 subscribes to 2 keys by 2 clients: %d subscriptions, %d keys, %d clients", st.Subscriptions, st.Keys, st.Clients)
	}
	if st.PendingBytes <= 0 || st.Coalesced != 0 {
		t.Fatalf("3 updates waiting: %d pending bytes, %d coalesced; want some bytes and none coalesced", st.PendingBytes, st.Coalesced)
	}
	before := st.PendingBytes

	// A change of k1 replaces the state both its subscribers still hold.
	f.bump(k1)
	if err := b.NotifyAllOfChange(k1); err != nil {
		t.Fatal(err)
	}
	awaitRounds(k1)
	st = b.Stats()
	if st.Coalesced != 2 {
		t.Errorf("one change of a key with 2 waiting subscribers: %d coalesced, want 2", st.Coalesced)
	}
	if st.PendingBytes != before {
		t.Errorf("pending bytes %d after a same-size replacement, want %d", st.PendingBytes, before)
	}

	got := map[shared.EntityKey]string{}
	for _, u := range c1.Take(nil) {
		got[u.Key] = row(u)
	}
	if len(got) != 2 || got[k1] != ":1" || got[k2] != ":0" {
		t.Fatalf("c1 took %v, want k1's newest state (:1) and k2's (:0)", got)
	}
	c1.Unsubscribe(k2)
	c2.Close()
	st = b.Stats()
	if st.Subscriptions != 1 || st.Keys != 1 || st.PendingBytes != 0 {
		t.Errorf("after Take, an unsubscribe and a close: %d subscriptions, %d keys, %d pending bytes; want 1, 1, 0",
			st.Subscriptions, st.Keys, st.PendingBytes)
	}
}
