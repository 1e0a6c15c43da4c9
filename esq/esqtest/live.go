package esqtest

import (
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
)

// livePoll is how often awaitLive asks a queue: Live is a state, with no
// event to wait for.
const livePoll = 10 * time.Millisecond

// awaitLive waits until q's Live says live (want) or not, and reports an
// error after timeout. A queue that does not implement esq.LiveReporter
// passes at once.
func awaitLive(t testing.TB, name string, q esq.Queue, want bool, timeout time.Duration) {
	t.Helper()
	r, ok := q.(esq.LiveReporter)
	if !ok {
		return
	}
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(livePoll)
	defer tick.Stop()
	for {
		err := r.Live()
		if (err == nil) == want {
			return
		}
		if time.Now().After(deadline) {
			if want {
				t.Errorf("%s: Live still says %q %s after it should be live again", name, err, timeout)
			} else {
				t.Errorf("%s: Live still says live %s after the broker stopped", name, timeout)
			}
			return
		}
		<-tick.C
	}
}
