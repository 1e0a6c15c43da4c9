package esweb

import (
	"encoding/binary"
	"encoding/json"

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
	b0 := 0x80 | opcode
	switch n := len(payload); {
	case n < 126:
		dst = append(dst, b0, byte(n))
	case n <= 0xFFFF:
		dst = append(dst, b0, 126)
		dst = binary.BigEndian.AppendUint16(dst, uint16(n))
	default:
		dst = append(dst, b0, 127)
		dst = binary.BigEndian.AppendUint64(dst, uint64(n))
	}
	return append(dst, payload...)
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

// prepareEnvelope encodes an update as one "rows" (or "gone") frame, once for
// every connection that receives it. Rows that are valid JSON are embedded
// as they are; any other row is embedded as a JSON string. It returns nil
// bytes if the frame cannot be encoded (the writer logs it).
func prepareEnvelope(u *esbridge.Update) any {
	f := rowsFrame{Type: "rows", Key: u.Key, Seq: u.Seq, Rows: make([]json.RawMessage, len(u.Rows))}
	if len(u.Rows) == 0 {
		f.Type = "gone"
	}
	for i, row := range u.Rows {
		if json.Valid(row) {
			f.Rows[i] = row
		} else {
			f.Rows[i], _ = json.Marshal(string(row))
		}
	}
	b, err := textFrame(f)
	if err != nil {
		return []byte(nil)
	}
	return b
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
