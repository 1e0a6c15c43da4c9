package esweb

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"testing"
)

// The frame reader takes any bytes a client sends: it never panics, never
// returns a message over the limit, and ends with errTooBig, a
// protocolError or the end of the input.
func FuzzFrameReader(f *testing.F) {
	mask := []byte{1, 2, 3, 4}
	f.Add(append([]byte{0x81, 0x82}, append(mask, '{'^1, '}'^2)...))
	f.Add(append([]byte{0x01, 0x81}, append(mask, 'a'^1)...))
	f.Add([]byte{0x81, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3, 4})
	// A fragment, then a continuation whose length overflows what was read.
	f.Add(append(append([]byte{0x01, 0x81}, append(mask, 'a')...), 0x80, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3, 4))
	f.Add(append([]byte{0x88, 0x82}, append(mask, 0x03^1, 0xE8^2)...))
	f.Fuzz(func(t *testing.T, in []byte) {
		const limit = 64
		r := frameReader{br: bufio.NewReaderSize(bytes.NewReader(in), 16), limit: limit}
		for {
			op, p, err := r.next()
			var perr protocolError
			switch {
			case err == nil:
				if op < opClose && len(p) > limit {
					t.Fatalf("message of %d bytes over the %d limit", len(p), limit)
				}
				if op == opClose {
					_, _ = parseClose(p)
				}
				continue
			case errors.Is(err, errTooBig):
				if r.skip() == nil {
					continue
				}
			case errors.As(err, &perr), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
			default:
				t.Fatalf("unexpected error %v", err)
			}
			return
		}
	})
}
