package testkit

import (
	"bytes"
	"runtime"
	"testing"
	"time"
)

// brokerFrames mark goroutines that belong to the embedded NSQ brokers, which
// start goroutines of their own for every topic a test creates.
var brokerFrames = [][]byte{
	[]byte("github.com/nsqio/nsq/"),
	[]byte("github.com/nsqio/go-diskqueue"),
	[]byte("entity-sync/internal/nsqtest"),
}

// Goroutines returns the stacks of the running goroutines, less the embedded
// brokers' ones.
func Goroutines() [][]byte {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out [][]byte
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		broker := false
		for _, f := range brokerFrames {
			if bytes.Contains(g, f) {
				broker = true
				break
			}
		}
		if !broker {
			out = append(out, g)
		}
	}
	return out
}

// AwaitGoroutines waits until no more than n goroutines (as counted by
// Goroutines) run, failing with their stacks after timeout. Goroutines end
// asynchronously after the connections they serve close, so a bounded wait is
// the only way to observe it.
func AwaitGoroutines(t testing.TB, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		gs := Goroutines()
		if len(gs) <= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines still running, %d expected:\n%s", len(gs), n, bytes.Join(gs, []byte("\n\n")))
		}
		time.Sleep(10 * time.Millisecond)
	}
}
