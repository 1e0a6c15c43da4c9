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

// prepareEnvelope encodes an update as one envelope frame, once for every
// connection that receives it: "rows" (or "gone"), or for a view (see
// esbridge.Update.Diff) "unchanged", or "diff" when that is smaller than
// the full state's frame. It returns nil bytes if the frame cannot be
// encoded (the writer logs it).
func prepareEnvelope(u *esbridge.Update) any {
	if u.Unchanged() {
		return encoded(unchangedFrame{Type: "unchanged", Key: u.Key, Seq: u.Seq, Version: u.Version()})
	}
	base, d := u.Diff()
	if d == nil {
		return encodeState(u)
	}
	full := u.Full().Memo(envelopeID{}, prepareEnvelope).([]byte)
	f := diffFrame{Type: "diff", Key: u.Key, Seq: u.Seq, Base: base, Version: u.Version(), Remove: d.Remove, Order: d.Order}
	if len(d.Upsert) > 0 {
		ids := u.IDs()
		f.Upsert = make([]upsert, len(d.Upsert))
		for i, at := range d.Upsert {
			f.Upsert[i] = upsert{ID: ids[at], Row: embedRow(u.Rows[at])}
		}
	}
	if b := encoded(f); b != nil && (full == nil || len(b) < len(full)) {
		return b
	}
	return full
}

// encodeState encodes u as a full state: "rows", or "gone" when it has no
// rows.
func encodeState(u *esbridge.Update) []byte {
	f := rowsFrame{Type: "rows", Key: u.Key, Seq: u.Seq, Version: u.Version(), IDs: u.IDs(), Rows: make([]json.RawMessage, len(u.Rows))}
	if len(u.Rows) == 0 {
		f.Type = "gone"
	}
	for i, row := range u.Rows {
		f.Rows[i] = embedRow(row)
	}
	return encoded(f)
}

// embedRow returns a row as it is embedded in a frame: as it is when it is
// valid JSON, otherwise as a JSON string of its bytes.
func embedRow(row []byte) json.RawMessage {
	if json.Valid(row) {
		return row
	}
	b, _ := json.Marshal(string(row))
	return b
}

// encoded is textFrame for a frame that prepareEnvelope memoizes: nil bytes
// when it cannot be encoded.
func encoded(v any) []byte {
	b, err := textFrame(v)
	if err != nil {
		return nil
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
