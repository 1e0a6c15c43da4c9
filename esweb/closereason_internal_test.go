package esweb

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// A close reason longer than a control frame can carry is cut at a rune
// boundary: the frame stays at most 125 bytes and its reason UTF-8.
func TestCloseReasonFitsAControlFrame(t *testing.T) {
	for _, reason := range []string{"", "short", strings.Repeat("a", 200), strings.Repeat("é", 100), "x" + strings.Repeat("€", 60)} {
		got := closeReason(reason)
		if len(got)+2 > 125 || !utf8.ValidString(got) || !strings.HasPrefix(reason, got) {
			t.Errorf("closeReason(%d bytes) = %d bytes, valid UTF-8 %v", len(reason), len(got), utf8.ValidString(got))
		}
		if len(reason) <= maxCloseReason && got != reason {
			t.Errorf("closeReason cut a reason of %d bytes", len(reason))
		}
	}
}
