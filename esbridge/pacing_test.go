package esbridge

import (
	"testing"
	"time"
)

// A key's next round waits after a long fan-out only when its changes come
// faster than its fan-outs take. A change that happened to arrive during a
// 3 ms fan-out of a key changing every 5 ms used to delay the next round by
// 1.5 ms although the workers kept up.
func TestPacingOnlyWhenChangesOutrunFanOuts(t *testing.T) {
	for _, c := range []struct {
		name      string
		every     time.Duration // between notifications
		fanOut    time.Duration
		wantPause time.Duration
	}{
		{"changes further apart than fan-outs", 5 * time.Millisecond, 3 * time.Millisecond, 0},
		{"changes faster than fan-outs", time.Millisecond, 3 * time.Millisecond, 1500 * time.Microsecond},
		{"short fan-outs", 100 * time.Microsecond, time.Millisecond, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			ks := &keyState{}
			now := time.Unix(1000, 0)
			for range 20 {
				ks.noteChange(now)
				now = now.Add(c.every)
			}
			ks.dirty = true
			if got := ks.pause(c.fanOut); got != c.wantPause {
				t.Errorf("pause after a %v fan-out, changes every %v: %v, want %v", c.fanOut, c.every, got, c.wantPause)
			}
			ks.dirty = false
			if got := ks.pause(c.fanOut); got != 0 {
				t.Errorf("pause without a change meanwhile: %v", got)
			}
		})
	}

	// The gap follows the rate: a key that slows down stops being paced.
	ks := &keyState{dirty: true}
	now := time.Unix(1000, 0)
	for range 20 {
		ks.noteChange(now)
		now = now.Add(time.Millisecond)
	}
	if ks.pause(3*time.Millisecond) == 0 {
		t.Fatal("not paced at 1,000 changes/s")
	}
	for range 40 {
		ks.noteChange(now)
		now = now.Add(10 * time.Millisecond)
	}
	if p := ks.pause(3 * time.Millisecond); p != 0 {
		t.Errorf("still paced (%v) after 40 changes 10 ms apart", p)
	}
}
