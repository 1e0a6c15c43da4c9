package esclient_test

import (
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esclient"
)

// TestCloseWaitsForRunningCallback: Close called on another goroutine while
// a callback runs returns only once that callback has returned, and no
// callback queued behind it starts afterwards. A second, concurrent Close
// waits as well.
func TestCloseWaitsForRunningCallback(t *testing.T) {
	f := startFake(t)
	c := dial(t, f.url, esclient.Options{})
	fc := f.accept()
	k, later := key("items", "1"), key("items", "2")

	entered := make(chan struct{})
	release := make(chan struct{})
	var finished bool // written by the callback, read after Close: -race checks the ordering
	var laterRan bool
	c.Subscribe(k, func([]json.RawMessage) {
		close(entered)
		<-release
		finished = true
	}, nil)
	c.Subscribe(later, func([]json.RawMessage) { laterRan = true }, nil)
	fc.ack(fc.expect("subscribe", k))
	fc.ack(fc.expect("subscribe", later))
	fc.rows(k, 1, `"a"`)
	<-entered
	// Queued behind the running callback (if the client reads it before
	// Close): must never run once Close was called.
	fc.rows(later, 2, `"b"`)

	var wg sync.WaitGroup
	returned := make(chan struct{}, 2)
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.Close()
			returned <- struct{}{}
		}()
	}
	// Nothing can signal "Close is blocked": give it time to return wrongly.
	select {
	case <-returned:
		t.Fatal("Close returned while a callback was still running")
	case <-time.After(300 * time.Millisecond):
	}
	close(release)
	wg.Wait()
	if !finished {
		t.Fatal("Close returned before the running callback finished")
	}
	if laterRan {
		t.Fatal("a callback started after Close was called")
	}
}
