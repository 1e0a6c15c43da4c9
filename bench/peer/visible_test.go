//go:build linux

package main

import (
	"slices"
	"testing"
)

func TestVisibleLatencies(t *testing.T) {
	notify := []int64{100, 200, 300, 400}
	// Changes 10..13. The client gets 10, skips 11 (12 replaces it), gets
	// 12 and 13; a stale 9 and a duplicate 12 change nothing.
	arrivals := []arrival{{9, 50}, {10, 150}, {12, 320}, {12, 330}, {13, 450}}
	got, missing := visibleLatencies(nil, arrivals, 10, notify)
	if want := []int64{50, 120, 20, 50}; !slices.Equal(got, want) || missing != 0 {
		t.Errorf("got %v missing %d, want %v missing 0", got, missing, want)
	}
	if n := countInRange(arrivals, 10, 4); n != 4 {
		t.Errorf("countInRange = %d, want 4", n)
	}
	// A client that stopped at 11 never saw 12 and 13.
	got, missing = visibleLatencies(nil, []arrival{{11, 210}}, 10, notify)
	if want := []int64{110, 10}; !slices.Equal(got, want) || missing != 2 {
		t.Errorf("got %v missing %d, want %v missing 2", got, missing, want)
	}
}

func TestParseVersion(t *testing.T) {
	for _, c := range []struct {
		msg string
		v   int64
		ok  bool
	}{
		{string(appendPayload(nil, 1234)), 1234, true},
		{`{"push":{"channel":"bench:1","pub":{"data":{"entity":"bench","id":"1","v":7}}}}`, 7, true},
		{`{"id":1,"connect":{"client":"x","version":"0.0.0","subs":{"bench:1":{}},"ping":25,"pong":true}}`, 0, false},
		{`{}`, 0, false},
		{`{"v":}`, 0, false},
	} {
		v, ok := parseVersion([]byte(c.msg))
		if v != c.v || ok != c.ok {
			t.Errorf("parseVersion(%s) = %d, %v; want %d, %v", c.msg, v, ok, c.v, c.ok)
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
