package esbridge

import (
	"context"
	"errors"
	"testing"
	"time"
)

// A fetch's context ends at FetchTimeout for a fetcher that waits on it,
// however late it first asks for Done, and says why.
func TestFetchContextDeadline(t *testing.T) {
	c := newFetchContext(context.Background(), 20*time.Millisecond)
	defer c.release()
	if err := c.Err(); err != nil {
		t.Fatalf("Err before the deadline: %v", err)
	}
	if d, ok := c.Deadline(); !ok || time.Until(d) > 20*time.Millisecond {
		t.Fatalf("Deadline = %v, %v", d, ok)
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed 5s after a 20ms deadline")
	}
	if err := c.Err(); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Err = %v, want DeadlineExceeded", err)
	}
	if err := context.Cause(c); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Cause = %v, want DeadlineExceeded", err)
	}

	// Past the deadline, a context never asked for Done reports it too.
	late := newFetchContext(context.Background(), -time.Second)
	defer late.release()
	if err := late.Err(); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Err past the deadline = %v", err)
	}
	select {
	case <-late.Done():
	default:
		t.Fatal("Done of a context past its deadline is open")
	}
}

// The bridge's cancellation (Close) reaches the fetch, and the fetch's
// context ends when it returns, even for a fetcher that looks only later.
func TestFetchContextCancel(t *testing.T) {
	parent, cancel := context.WithCancel(context.Background())
	c := newFetchContext(parent, time.Hour)
	done := c.Done()
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("parent's cancel did not reach Done")
	}
	if err := c.Err(); !errors.Is(err, context.Canceled) {
		t.Fatalf("Err = %v, want Canceled", err)
	}
	c.release()

	r := newFetchContext(context.Background(), time.Hour)
	r.release()
	if err := r.Err(); !errors.Is(err, context.Canceled) {
		t.Fatalf("Err after release = %v, want Canceled", err)
	}
	select {
	case <-r.Done():
	default:
		t.Fatal("Done after release is open")
	}

	type key struct{}
	v := newFetchContext(context.WithValue(context.Background(), key{}, "v"), time.Hour)
	defer v.release()
	if got := v.Value(key{}); got != "v" {
		t.Fatalf("Value = %v", got)
	}
}
