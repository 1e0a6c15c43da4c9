//go:build linux

package main

import (
	"cmp"
	"slices"
)

// change is one change a row made: the entity, the version it made and
// the UnixNano time it was made (the zero point of "visible").
type change struct {
	ID int   `json:"id"`
	V  int64 `json:"v"`
	At int64 `json:"at"`
}

// keyChanges are one entity's changes in a row, in version order.
type keyChanges struct {
	vs []int64 // versions, ascending
	at []int64 // at[i]: when vs[i] was made
}

// groupChanges splits a row's changes by entity.
func groupChanges(changes []change) map[int]*keyChanges {
	sorted := slices.Clone(changes)
	slices.SortStableFunc(sorted, func(a, b change) int {
		return cmp.Or(cmp.Compare(a.ID, b.ID), cmp.Compare(a.V, b.V))
	})
	m := make(map[int]*keyChanges)
	for _, c := range sorted {
		kc := m[c.ID]
		if kc == nil {
			kc = &keyChanges{}
			m[c.ID] = kc
		}
		kc.vs = append(kc.vs, c.V)
		kc.at = append(kc.at, c.At)
	}
	return m
}

// visibleLatencies appends to dst, for each change of one entity (kc), how
// long one client took to hold a state at least as new: the receive time
// of the first arrival with a version >= the change's, minus the moment
// the change was made. A state the client never received (skipped because
// a newer one replaced it) counts as visible when that newer one arrived,
// which is what a user of the client sees. arrivals are the client's
// arrivals for that entity, in receive order. missing counts the changes
// no arrival covered; delivered counts the arrivals carrying one of the
// changes' versions.
func visibleLatencies(dst []int64, arrivals []arrival, kc *keyChanges) (out []int64, missing, delivered int) {
	next := 0 // index of the first change not yet visible
	first, last := kc.vs[0], kc.vs[len(kc.vs)-1]
	for _, a := range arrivals {
		if a.v >= first && a.v <= last {
			delivered++
		}
		for next < len(kc.vs) && kc.vs[next] <= a.v {
			dst = append(dst, a.at-kc.at[next])
			next++
		}
	}
	return dst, len(kc.vs) - next, delivered
}

// percentiles sorts samples and returns its p50, p99 and maximum (zeros
// when empty).
func percentiles(samples []int64) (p50, p99, maxv int64) {
	if len(samples) == 0 {
		return 0, 0, 0
	}
	slices.Sort(samples)
	n := len(samples)
	return samples[n*50/100], samples[min(n-1, n*99/100)], samples[n-1]
}
