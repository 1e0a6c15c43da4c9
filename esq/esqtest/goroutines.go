package esqtest

import (
	"bytes"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// goroutine is one goroutine of a runtime.Stack dump.
type goroutine struct {
	id    uint64
	stack string
}

func goroutines() []goroutine {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []goroutine
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		// "goroutine 42 [running]:"
		rest, ok := bytes.CutPrefix(g, []byte("goroutine "))
		if !ok {
			continue
		}
		idText, _, _ := bytes.Cut(rest, []byte(" "))
		id, err := strconv.ParseUint(string(idText), 10, 64)
		if err != nil {
			continue
		}
		out = append(out, goroutine{id: id, stack: string(g)})
	}
	return out
}

func goroutineIDs() map[uint64]bool {
	ids := make(map[uint64]bool)
	for _, g := range goroutines() {
		ids[g.id] = true
	}
	return ids
}

// newGoroutines returns the goroutines that did not exist in before, less
// the caller's own and those whose stack contains one of ignore.
func newGoroutines(before map[uint64]bool, ignore []string) []goroutine {
	var out []goroutine
	for _, g := range goroutines() {
		if before[g.id] || strings.Contains(g.stack, "esqtest.newGoroutines") {
			continue
		}
		skip := false
		for _, s := range ignore {
			if strings.Contains(g.stack, s) {
				skip = true
				break
			}
		}
		if !skip {
			out = append(out, g)
		}
	}
	return out
}

// awaitNoNewGoroutines waits until every goroutine started since before has
// ended (ignoring the broker's), failing t with their stacks after timeout.
// Goroutines end asynchronously after the connections they serve close, so
// a bounded poll is the only way to observe it.
func awaitNoNewGoroutines(t testing.TB, before map[uint64]bool, ignore []string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		left := newGoroutines(before, ignore)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			stacks := make([]string, len(left))
			for i, g := range left {
				stacks[i] = g.stack
			}
			t.Fatalf("%d goroutines started by the queue still run %s after Close returned (if they belong to a broker embedded in the test, list them in Features.BrokerGoroutines):\n\n%s",
				len(left), timeout, strings.Join(stacks, "\n\n"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}
