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
	id, err := randomHex(8)
	if err != nil {
		t.Fatal(err)
	}
	if got := len(stamp(body, at, id, math.MaxUint64)); got != len(body)+stampBytes {
		t.Fatalf("stamped body is %d bytes, want at most %d + %d", got, len(body), stampBytes)
	}
	d := newLossDetector(limited{NewMemory(), 7999}, defaultLossTiming)
	if got := d.MaxMessageBytes(); got != 7999-stampBytes {
		t.Fatalf("MaxMessageBytes %d, want %d", got, 7999-stampBytes)
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
