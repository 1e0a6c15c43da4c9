package esq

import (
	"math"
	"testing"
)

// The stamp's largest size is what MaxMessageBytes keeps free, so a body
// that fits the wrapped queue's limit less it fits once stamped.
func TestStampFitsTheLimitMargin(t *testing.T) {
	body := []byte(`{"entity":"items","ids":["1","2"]}`)
	at, ok := stampAt(body)
	if !ok {
		t.Fatal("body not stampable")
	}
	d := newLossDetector(limited{NewMemory(), 7999}, defaultLossTiming)
	if got, want := len(stamp(body, at, d.id, math.MaxUint64)), len(body)+stampBytes(d.id); got != want {
		t.Fatalf("stamped body is %d bytes, want at most %d", got, want)
	}
	if got, want := d.MaxMessageBytes(), 7999-stampBytes(d.id); got != want {
		t.Fatalf("MaxMessageBytes %d, want %d", got, want)
	}
	if got := newLossDetector(NewMemory(), defaultLossTiming).MaxMessageBytes(); got != 0 {
		t.Fatalf("MaxMessageBytes without a limit: %d, want 0", got)
	}
}

type limited struct {
	*Memory
	max int
}

func (l limited) MaxMessageBytes() int { return l.max }
