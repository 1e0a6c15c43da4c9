//go:build linux

package main

import (
	"math/rand/v2"
	"testing"
	"time"
)

// Every occurrence of a fault starts after the lead-in and, when the run is
// long enough for its slots, ends inside the run without overlapping the
// next one.
func TestPlaceKeepsOccurrencesApartAndInsideTheRun(t *testing.T) {
	for _, d := range []time.Duration{60 * time.Second, 3 * time.Minute, 10 * time.Minute} {
		o := &orchestrator{cfg: config{duration: d}, nextNSQD: -1}
		for _, k := range o.allFaultKinds() {
			for seed := range uint64(50) {
				times := o.place(rand.New(rand.NewPCG(seed, 1)), k)
				if len(times) != k.count {
					t.Fatalf("%s %s: %d occurrences, want %d", d, k.name, len(times), k.count)
				}
				for i, at := range times {
					if at < min(5*time.Second, d/10) {
						t.Errorf("%s %s: occurrence %d at %s, before the lead-in", d, k.name, i, at)
					}
					if at+k.span > d {
						t.Errorf("%s %s: occurrence %d at %s lasts past the run's end", d, k.name, i, at)
					}
					if i > 0 && times[i-1]+k.span > at {
						t.Errorf("%s %s: occurrence %d at %s overlaps the previous one at %s", d, k.name, i, at, times[i-1])
					}
				}
			}
		}
	}
}
