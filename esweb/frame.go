package esweb

import (
	"encoding/binary"
	"encoding/json"
	"strconv"
	"unicode/utf8"

	"github.com/entity-sync/entity-sync/esbridge"
)

// The server writes websocket frames itself instead of through
// gorilla/websocket's writer: an update is encoded into frame bytes once, and
// those same bytes go to every subscriber with one write system call each,
// without a per-write lock, buffer copy or deadline. Server frames are never
// masked, and compression is not negotiated, so a frame is a 2 to 10 byte
// header and the payload (RFC 6455, section 5.2).

// Frame opcodes.
const (
	opText  = 0x1
	opClose = 0x8
	opPing  = 0x9
	opPong  = 0xA
)

// appendFrame appends one final, unmasked frame holding payload to dst.
func appendFrame(dst []byte, opcode byte, payload []byte) []byte {
	return append(appendHeader(dst, opcode, len(payload)), payload...)
}

// maxHeader is the longest frame header a server writes.
const maxHeader = 10

// appendHeader appends the header of one final, unmasked frame with a
// payload of n bytes to dst.
func appendHeader(dst []byte, opcode byte, n int) []byte {
	b0 := 0x80 | opcode
	switch {
	case n < 126:
		return append(dst, b0, byte(n))
	case n <= 0xFFFF:
		return binary.BigEndian.AppendUint16(append(dst, b0, 126), uint16(n))
	default:
		return binary.BigEndian.AppendUint64(append(dst, b0, 127), uint64(n))
	}
}

// textFrame encodes v as JSON in a text frame.
func textFrame(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return appendFrame(make([]byte, 0, len(b)+10), opText, b), nil
}

var (
	pingFrame      = appendFrame(nil, opPing, nil)
	heartbeatFrame = appendFrame(nil, opText, []byte(`{"type":"heartbeat"}`))
)

// envelopeID is the Memo id of an update's envelope frame.
type envelopeID struct{}

// The state frames (rows, gone, diff, unchanged) are built by appending
// bytes rather than by json.Marshal, so that each row goes on the wire
// exactly as the fetch produced it: json.Marshal compacts a RawMessage and
// escapes <, >, & and U+2028/U+2029 in it, so a client would not receive
// the bytes the state's version was computed over (docs/protocol.md, "Rows
// on the wire"). Building them directly also spares a copy of every row.

// prepareEnvelope encodes an update as one envelope frame, once for every
// connection that receives it: "rows" (or "gone"), or for a view (see
// esbridge.Update.Diff) "unchanged", or "diff" when that is smaller than
// the full state's frame.
func prepareEnvelope(u *esbridge.Update) any {
	if u.Unchanged() {
		b := startState(make([]byte, maxHeader, maxHeader+128), "unchanged", u)
		return finishFrame(append(appendVersion(b, u), '}'))
	}
	base, d := u.Diff()
	if d == nil {
		return encodeState(u)
	}
	full := u.Full().Memo(envelopeID{}, prepareEnvelope).([]byte)
	if b := encodeDiff(u, base, d, len(full)); b != nil {
		return b
	}
	return full
}

// encodeDiff encodes view u as a diff frame from base, or returns nil when
// the frame would not be smaller than limit bytes (the full state's).
func encodeDiff(u *esbridge.Update, base string, d *esbridge.Diff, limit int) []byte {
	rows := 0
	for _, at := range d.Upsert {
		rows += len(u.Rows[at])
	}
	if rows >= limit {
		return nil // not worth building
	}
	size := maxHeader + 128 + rows + 32*len(d.Upsert)
	b := startState(make([]byte, maxHeader, size), "diff", u)
	b = append(b, `,"base":`...)
	b = appendString(b, base)
	b = appendVersion(b, u)
	if len(d.Upsert) > 0 {
		ids := u.IDs()
		b = append(b, `,"upsert":[`...)
		for i, at := range d.Upsert {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"id":`...)
			b = appendString(b, ids[at])
			b = append(b, `,"row":`...)
			b = appendRow(b, u.Rows[at])
			b = append(b, '}')
		}
		b = append(b, ']')
	}
	b = appendStrings(b, `,"remove":`, d.Remove)
	b = appendStrings(b, `,"order":`, d.Order)
	if f := finishFrame(append(b, '}')); len(f) < limit {
		return f
	}
	return nil
}

// encodeState encodes u as a full state: "rows", or "gone" when it has no
// rows.
func encodeState(u *esbridge.Update) []byte {
	typ := "rows"
	if len(u.Rows) == 0 {
		typ = "gone"
	}
	ids := u.IDs()
	size := maxHeader + 128
	for _, row := range u.Rows {
		size += len(row) + 1
	}
	for _, id := range ids {
		size += len(id) + 3
	}
	b := startState(make([]byte, maxHeader, size), typ, u)
	b = appendVersion(b, u)
	b = appendStrings(b, `,"ids":`, ids)
	if len(u.Rows) > 0 {
		b = append(b, `,"rows":[`...)
		for i, row := range u.Rows {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendRow(b, row)
		}
		b = append(b, ']')
	}
	return finishFrame(append(b, '}'))
}

// startState appends the fields every state frame starts with to b.
func startState(b []byte, typ string, u *esbridge.Update) []byte {
	b = append(b, `{"type":"`...)
	b = append(b, typ...)
	b = append(b, `","key":{"entity":`...)
	b = appendString(b, string(u.Key.Entity))
	b = append(b, `,"id":`...)
	b = appendString(b, u.Key.ID)
	b = append(b, `},"seq":`...)
	return strconv.AppendUint(b, u.Seq, 10)
}

func appendVersion(b []byte, u *esbridge.Update) []byte {
	b = append(b, `,"version":`...)
	return appendString(b, u.Version())
}

// appendStrings appends field and a JSON array of ss, or nothing when ss is
// empty.
func appendStrings(b []byte, field string, ss []string) []byte {
	if len(ss) == 0 {
		return b
	}
	b = append(b, field...)
	b = append(b, '[')
	for i, s := range ss {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendString(b, s)
	}
	return append(b, ']')
}

// appendRow appends a row as it is embedded in a frame: byte for byte when
// it is valid JSON, otherwise as a JSON string of its bytes. (The bridge
// has made every row valid UTF-8.)
func appendRow(b, row []byte) []byte {
	if json.Valid(row) {
		return append(b, row...)
	}
	return appendString(b, string(row))
}

// appendString appends s as a JSON string. Only what JSON requires is
// escaped (quote, backslash, control characters); invalid UTF-8 becomes
// U+FFFD, so a frame stays valid UTF-8 whatever s holds.
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		if c >= utf8.RuneSelf {
			r, size := utf8.DecodeRuneInString(s[i:])
			if r != utf8.RuneError || size != 1 {
				i += size
				continue
			}
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i++
			start = i
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xF])
		}
		i++
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

const hex = "0123456789abcdef"

// finishFrame turns b, a payload appended after maxHeader bytes of room,
// into a text frame: the header goes right before the payload, so the
// payload is never copied.
func finishFrame(b []byte) []byte {
	var h [maxHeader]byte
	header := appendHeader(h[:0], opText, len(b)-maxHeader)
	start := maxHeader - len(header)
	copy(b[start:], header)
	return b[start:]
}

// rawFramesID is the Memo id of an update's frames in the seed's protocol:
// one text frame per row, all in one byte slice so a connection writes them
// with one system call.
type rawFramesID struct{}

func prepareRaw(u *esbridge.Update) any {
	n := 0
	for _, row := range u.Rows {
		n += len(row) + 10
	}
	b := make([]byte, 0, n)
	for _, row := range u.Rows {
		b = appendFrame(b, opText, row)
	}
	return b
}
