//go:build linux

package main

import (
	"slices"
	"testing"
)

// TestComputeBreakdown joins a made-up row: changes 10, 11 and 12, two
// clients. Change 10 has its own round; 11's round fetched 12 (answered
// before 12 was notified: ambiguous); 12 has its own round too.
func TestComputeBreakdown(t *testing.T) {
	notify := []int64{1000, 2000, 3000}
	calls := []int64{5, 6, 7}
	raw := breakdownRaw{
		stamps: stampsResult{
			Rounds: []roundRec{
				// Listed out of order on purpose.
				{V: 12, Notified: 3010, Started: 3020, Fetched: 3030, Delivered: 3100, Deliveries: 2},
				{V: 10, Notified: 1010, Started: 1015, Fetched: 1020, Delivered: 1090, Deliveries: 2},
				{V: 12, Notified: 2010, Started: 2995, Fetched: 2999, Delivered: 2999},
				{V: 9, Started: 500, Fetched: 510}, // a subscribe's round: not the row's
			},
			Writes: map[string][]int64{
				"a": {3050, 1040},
				"b": {1080, 3090},
			},
		},
		arrivals: map[string][][2]int64{
			"a": {{10, 1100}, {12, 3060}},
			"b": {{10, 1200}, {12, 3095}, {12, 3200}},
		},
	}
	st, info := computeBreakdown(10, notify, calls, raw)
	want := breakdownInfo{changes: 3, rounds: 2, coalesced: 1, ambiguous: 1, written: 4, read: 4}
	if info != want {
		t.Errorf("info %+v, want %+v", info, want)
	}
	check := func(s int, want ...int64) {
		t.Helper()
		got := slices.Clone(st[s])
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("%s: %v, want %v", stageNames[s], got, want)
		}
	}
	check(stNotifyCall, 5, 6, 7)
	check(stQueue, 10, 10)
	check(stToFetch, 5, 10)
	check(stFetch, 5, 10)
	check(stFirstWrite, 20, 20)
	check(stFanOut, 40, 40)
	check(stDelivered, 70, 70)
	check(stSocket, 60, 120, 10, 5)
	check(stLastClient, 120, 5)
	check(stTotal, 100, 200, 60, 95)
}
