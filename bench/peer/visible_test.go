//go:build linux

package main

import (
	"slices"
	"testing"
)

func TestVisibleLatencies(t *testing.T) {
	// Key 5 changed to versions 10..13 at 100..400; key 6 once, in
	// between. The client gets 10, skips 11 (12 replaces it), gets 12 and
	// 13; a stale 9 and a duplicate 12 change nothing.
	byKey := groupChanges([]change{{5, 10, 100}, {6, 3, 150}, {5, 11, 200}, {5, 12, 300}, {5, 13, 400}})
	kc := byKey[5]
	arrivals := []arrival{{5, 9, 50}, {5, 10, 150}, {5, 12, 320}, {5, 12, 330}, {5, 13, 450}}
	got, missing, delivered := visibleLatencies(nil, arrivals, kc)
	if want := []int64{50, 120, 20, 50}; !slices.Equal(got, want) || missing != 0 || delivered != 4 {
		t.Errorf("got %v missing %d delivered %d, want %v missing 0 delivered 4", got, missing, delivered, want)
	}
	// A client that stopped at 11 never saw 12 and 13.
	got, missing, _ = visibleLatencies(nil, []arrival{{5, 11, 210}}, kc)
	if want := []int64{110, 10}; !slices.Equal(got, want) || missing != 2 {
		t.Errorf("got %v missing %d, want %v missing 2", got, missing, want)
	}
	if k6 := byKey[6]; len(k6.vs) != 1 || k6.vs[0] != 3 || k6.at[0] != 150 {
		t.Errorf("key 6: %+v", k6)
	}
}

func TestParseMsg(t *testing.T) {
	for _, c := range []struct {
		msg string
		id  int
		v   int64
		ok  bool
	}{
		{string(appendPayload(nil, 12, 1234)), 12, 1234, true},
		{`{"push":{"channel":"bench:3","pub":{"data":{"entity":"bench","id":"3","v":7}}}}`, 3, 7, true},
		{`{"type":"rows","key":{"entity":"bench","id":"44"},"seq":9,"version":"72aff1bf32fb4a78","rows":[{"entity":"bench","id":"44","v":8}]}`, 44, 8, true},
		{`{"id":1,"connect":{"client":"x","version":"0.0.0","subs":{"bench:1":{}},"ping":25,"pong":true}}`, 0, 0, false},
		{`{"type":"welcome","protocol":"entitysync.v1","limits":{"maxIdLength":256},"heartbeatMs":25000}`, 0, 0, false},
		{`{"type":"ack","ref":"3"}`, 0, 0, false},
		{`{}`, 0, 0, false},
		{`{"id":"1","v":}`, 0, 0, false},
	} {
		id, v, ok := parseMsg([]byte(c.msg))
		if id != c.id && c.ok || v != c.v || ok != c.ok {
			t.Errorf("parseMsg(%s) = %d, %d, %v; want %d, %d, %v", c.msg, id, v, ok, c.id, c.v, c.ok)
		}
	}
}

func TestPercentiles(t *testing.T) {
	s := make([]int64, 100)
	for i := range s {
		s[i] = int64(100 - i)
	}
	if p50, p99, mx := percentiles(s); p50 != 51 || p99 != 100 || mx != 100 {
		t.Errorf("percentiles = %d %d %d", p50, p99, mx)
	}
}

// TestSubscriptionPlan checks the many-keys plan: every key has between
// min and max subscribers on distinct connections, and the same seed gives
// the same plan; the one-key plan puts every connection on key 1.
func TestSubscriptionPlan(t *testing.T) {
	plan := subscriptionPlan(100, 1000, 1, 5, 7)
	subs := map[int]int{}
	for _, keys := range plan {
		seen := map[int]bool{}
		for _, k := range keys {
			if seen[k] {
				t.Fatalf("key %d twice on one connection", k)
			}
			seen[k] = true
			subs[k]++
		}
	}
	for k := 1; k <= 1000; k++ {
		if subs[k] < 1 || subs[k] > 5 {
			t.Fatalf("key %d has %d subscribers", k, subs[k])
		}
	}
	if again := subscriptionPlan(100, 1000, 1, 5, 7); !slices.EqualFunc(plan, again, slices.Equal) {
		t.Error("the same seed gave another plan")
	}
	for i, keys := range subscriptionPlan(50, 1, 50, 50, 1) {
		if !slices.Equal(keys, []int{1}) {
			t.Fatalf("one-key plan: connection %d holds %v", i, keys)
		}
	}
}

// TestChangeSequence checks that both distributions stay in 1..keys, that
// Zipf concentrates on a few keys and uniform does not, and that a seed
// gives the same sequence.
func TestChangeSequence(t *testing.T) {
	const keys, n = 10000, 20000
	top := func(ids []int) int {
		c := map[int]int{}
		m := 0
		for _, id := range ids {
			if id < 1 || id > keys {
				t.Fatalf("id %d out of range", id)
			}
			c[id]++
			m = max(m, c[id])
		}
		return m
	}
	z := changeSequence("zipf", keys, n, 1.1, 1)
	u := changeSequence("uniform", keys, n, 1.1, 1)
	if zt, ut := top(z), top(u); zt < n/20 || ut > n/500 {
		t.Errorf("hottest key: zipf %d, uniform %d of %d changes", zt, ut, n)
	}
	if !slices.Equal(z, changeSequence("zipf", keys, n, 1.1, 1)) {
		t.Error("the same seed gave another sequence")
	}
}
