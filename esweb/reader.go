package esweb

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"

	"github.com/gorilla/websocket"
)

// The server reads client frames itself too (gorilla/websocket only does the
// handshake): gorilla's reader answers a frame over the read limit or a
// protocol error by writing a close frame of its own, beside this
// connection's writer and possibly into the middle of one of its frames,
// and leaves the closing to the application. Reading here, every close goes
// through the connection's writer (see closeWith).

// Opcodes only clients send us (the others are in frame.go).
const (
	opContinuation = 0x0
	opBinary       = 0x2
)

// errTooBig is a message larger than Options.ReadLimit: closed with 1009.
var errTooBig = errors.New("frame larger than the read limit")

// protocolError is a frame that breaks RFC 6455: closed with 1002.
type protocolError string

func (e protocolError) Error() string { return "protocol error: " + string(e) }

// frameReader reads a client's frames from the connection's read buffer.
type frameReader struct {
	br    *bufio.Reader
	limit int64

	// A fragmented message being assembled: its opcode (0 when none) and
	// the payload so far.
	msgOp byte
	msg   []byte
	hdr   [8]byte
	skipN int64 // the unread payload of a frame refused as too big
}

// skip reads past the payload of the frame next refused as too big.
func (r *frameReader) skip() error {
	_, err := io.CopyN(io.Discard, r.br, r.skipN)
	r.skipN = 0
	return err
}

// next returns the next control frame (close, ping, pong) or complete data
// message (text or binary, fragments joined), its payload unmasked. An
// error is errTooBig, a protocolError, or the connection's read error.
func (r *frameReader) next() (op byte, payload []byte, err error) {
	for {
		fin, op, n, mask, err := r.header()
		if err != nil {
			return 0, nil, err
		}
		if op >= opClose {
			payload, err := r.payload(n, mask)
			return op, payload, err
		}
		switch {
		case op == opContinuation && r.msgOp == 0:
			return 0, nil, protocolError("continuation frame without a message to continue")
		case op != opContinuation && r.msgOp != 0:
			return 0, nil, protocolError("new message inside a fragmented one")
		case n > r.limit-int64(len(r.msg)): // not len+n: that can overflow
			r.skipN, r.msg = n, nil
			return 0, nil, errTooBig
		}
		p, err := r.payload(n, mask)
		if err != nil {
			return 0, nil, err
		}
		if op == opContinuation {
			op, p = r.msgOp, append(r.msg, p...)
		}
		if fin {
			r.msgOp, r.msg = 0, nil
			return op, p, nil
		}
		r.msgOp, r.msg = op, p
	}
}

// header reads a frame header and checks it.
func (r *frameReader) header() (fin bool, op byte, n int64, mask [4]byte, err error) {
	b := r.hdr[:2]
	if _, err = io.ReadFull(r.br, b); err != nil {
		return
	}
	fin, op = b[0]&0x80 != 0, b[0]&0x0F
	masked, n7 := b[1]&0x80 != 0, b[1]&0x7F
	switch {
	case b[0]&0x70 != 0:
		err = protocolError("reserved bits set (no extension was negotiated)")
	case op > opBinary && op < opClose || op > opPong:
		err = protocolError(fmt.Sprintf("unknown opcode %d", op))
	case op >= opClose && (!fin || n7 > 125):
		err = protocolError("fragmented or long control frame")
	case !masked:
		err = protocolError("unmasked client frame")
	}
	if err != nil {
		return
	}
	switch n7 {
	case 126:
		if _, err = io.ReadFull(r.br, r.hdr[:2]); err != nil {
			return
		}
		n = int64(binary.BigEndian.Uint16(r.hdr[:2]))
	case 127:
		if _, err = io.ReadFull(r.br, r.hdr[:8]); err != nil {
			return
		}
		u := binary.BigEndian.Uint64(r.hdr[:8])
		if u>>63 != 0 {
			err = protocolError("payload length with the top bit set")
			return
		}
		n = int64(u)
	default:
		n = int64(n7)
	}
	_, err = io.ReadFull(r.br, mask[:])
	return
}

// payload reads n bytes of payload and unmasks them. The buffer grows as
// bytes arrive, not to the length a header claims: a client sending headers
// alone pins no memory.
func (r *frameReader) payload(n int64, mask [4]byte) ([]byte, error) {
	p, err := io.ReadAll(io.LimitReader(r.br, n))
	if err != nil {
		return nil, err
	}
	if int64(len(p)) < n {
		return nil, io.ErrUnexpectedEOF
	}
	for i := range p {
		p[i] ^= mask[i&3]
	}
	return p, nil
}

// parseClose reads a close frame's payload: its code
// (websocket.CloseNoStatusReceived when it has none) or a protocolError.
func parseClose(p []byte) (code int, err error) {
	switch {
	case len(p) == 0:
		return websocket.CloseNoStatusReceived, nil
	case len(p) == 1:
		return 0, protocolError("close frame with a 1-byte payload")
	case !utf8.Valid(p[2:]):
		return 0, protocolError("close reason is not UTF-8")
	}
	code = int(binary.BigEndian.Uint16(p))
	switch {
	case code >= 1000 && code <= 1003, code >= 1007 && code <= 1014, code >= 3000 && code <= 4999:
		return code, nil
	}
	return 0, protocolError(fmt.Sprintf("close code %d may not be sent", code))
}
