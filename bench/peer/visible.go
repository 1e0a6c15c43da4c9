//go:build linux

package main

import "slices"

// visibleLatencies appends to dst, for each change firstV+i notified at
// notify[i] (UnixNano), how long one client took to hold a state at least
// as new: the receive time of the first arrival with version >= firstV+i,
// minus notify[i]. A state the client never received (skipped because a
// newer one replaced it) counts as visible when that newer one arrived,
// which is what a user of the client sees. arrivals must be in receive
// order. missing counts the changes no arrival covered.
func visibleLatencies(dst []int64, arrivals []arrival, firstV int64, notify []int64) (out []int64, missing int) {
	next := 0 // index of the first change not yet visible
	for _, a := range arrivals {
		for next < len(notify) && firstV+int64(next) <= a.v {
			dst = append(dst, a.at-notify[next])
			next++
		}
		if next == len(notify) {
			break
		}
	}
	return dst, len(notify) - next
}

// countInRange counts the arrivals whose version is one of the changes
// [firstV, firstV+n): the frames delivered for those changes.
func countInRange(arrivals []arrival, firstV int64, n int) int {
	c := 0
	for _, a := range arrivals {
		if a.v >= firstV && a.v < firstV+int64(n) {
			c++
		}
	}
	return c
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
