package esbridge

import (
	"testing"
	"time"
)

// rounds feeds ks n rounds, each ending every apart and answering per
// notifications, starting at now; it returns the time after the last.
func rounds(ks *keyState, now time.Time, n, per int, every time.Duration) time.Time {
	for range n {
		ks.changes += per
		now = now.Add(every)
		ks.noteRound(now)
	}
	return now
}

// A key's next round waits after a long fan-out only when its changes come
// faster than its fan-outs take. A change that happened to arrive during a
// 3 ms fan-out of a key changing every 5 ms used to delay the next round by
// 1.5 ms although the workers kept up.
func TestPacingOnlyWhenChangesOutrunFanOuts(t *testing.T) {
	for _, c := range []struct {
		name      string
		per       int           // notifications per round
		every     time.Duration // between round ends
		fanOut    time.Duration
		wantPause time.Duration
	}{
		{"changes further apart than fan-outs", 1, 5 * time.Millisecond, 3 * time.Millisecond, 0},
		{"changes faster than fan-outs", 3, 3 * time.Millisecond, 3 * time.Millisecond, 1500 * time.Microsecond},
		{"short fan-outs", 10, time.Millisecond, time.Millisecond, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			ks := &keyState{}
			rounds(ks, time.Unix(1000, 0), 20, c.per, c.every)
			ks.dirty = true
			if got := ks.pause(c.fanOut); got != c.wantPause {
				t.Errorf("pause after a %v fan-out, %d changes every %v: %v, want %v", c.fanOut, c.per, c.every, got, c.wantPause)
			}
			ks.dirty = false
			if got := ks.pause(c.fanOut); got != 0 {
				t.Errorf("pause without a change meanwhile: %v", got)
			}
		})
	}

	// The gap follows the rate: a key that slows down stops being paced,
	// and rounds without a notification (a subscribe) do not count.
	ks := &keyState{dirty: true}
	now := rounds(ks, time.Unix(1000, 0), 20, 3, 3*time.Millisecond)
	if ks.pause(3*time.Millisecond) == 0 {
		t.Fatal("not paced at 1,000 changes/s")
	}
	now = rounds(ks, now, 5, 0, time.Millisecond)
	if ks.pause(3*time.Millisecond) == 0 {
		t.Fatal("rounds without notifications changed the rate")
	}
	rounds(ks, now, 40, 1, 10*time.Millisecond)
	if p := ks.pause(3 * time.Millisecond); p != 0 {
		t.Errorf("still paced (%v) after 40 changes 10 ms apart", p)
	}
}
