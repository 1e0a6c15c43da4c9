package esweb_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esweb"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

// Every close reaches the client with its code before the socket closes.
// The tests read with gorilla's client; clients/js/test has the same checks
// from the ws package and from Chromium.

// A client closes while the server is in the middle of writing it a large
// frame: the server finishes the frame, answers with the client's code
// (RFC 6455 5.5.1) and then closes, instead of closing the socket on the
// frame's tail (the client saw 1006).
func TestClientCloseAnsweredWhileWriting(t *testing.T) {
	const rowSize = 4 << 20
	e, srv := serveBig(t, rowSize, nil, esweb.Options{})
	dialer := websocket.Dialer{NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err == nil {
			_ = c.(*net.TCPConn).SetReadBuffer(64 << 10)
		}
		return c, err
	}}
	c, _, err := dialer.Dial(testkit.WSURL(srv), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.WriteJSON(map[string]any{"action": "subscribe", "body": shared.EntityKey{Entity: "big", ID: "1"}}); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(wait))
	_, r, err := c.NextReader()
	if err != nil {
		t.Fatal(err)
	}
	// The frame has begun, and its 4 MiB cannot all be in the sockets'
	// buffers: the server is writing it.
	if _, err := io.ReadFull(r, make([]byte, 1024)); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(4001, "leaving"), time.Now().Add(wait)); err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, r)
	if err != nil {
		t.Fatalf("the frame being written when the client closed was cut after %d more bytes: %v", n, err)
	}
	_, _, err = c.ReadMessage()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != 4001 {
		t.Fatalf("after the frame: %v, want the server's close frame with the client's code 4001", err)
	}
	// Then the server closes its end.
	if _, err := c.UnderlyingConn().Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("after the close frame: %v, want EOF", err)
	}
	testkit.AwaitCond(t, wait, func() (bool, string) {
		return e.Web.Connections() == 0, "the connection is still registered"
	})
}

// A frame over the read limit (32 KiB by default) is answered with close
// code 1009, and the connection ends in order: the server reads past the
// rest of the frame to the client's answer instead of closing the socket
// on unread data, which reset the connection (browsers lost the close frame
// and saw 1006).
func TestTooBigFrameClosesWith1009(t *testing.T) {
	e, srv := testkit.Serve(t, es.Config{})
	c, _, err := websocket.DefaultDialer.Dial(testkit.WSURL(srv), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.WriteMessage(websocket.TextMessage, []byte(`{"action":"secret","body":"`+strings.Repeat("x", 40<<10)+`"}`)); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(wait))
	_, _, err = c.ReadMessage()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != websocket.CloseMessageTooBig {
		t.Fatalf("got %v, want close 1009", err)
	}
	// gorilla's client answered the close; then the server closes its end
	// in order (a reset here is what lost browsers the close frame).
	if _, err := c.UnderlyingConn().Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("after the close frame: %v, want EOF", err)
	}
	if n := e.Web.Stats().FramesTooLarge; n != 1 {
		t.Errorf("FramesTooLarge = %d, want 1", n)
	}
}

// Frames that break RFC 6455 are answered with close code 1002 and a
// reason, written by the connection's own writer, and counted.
func TestProtocolErrorClosesWith1002(t *testing.T) {
	for name, frame := range map[string][]byte{
		"unmasked":           {0x81, 0x02, '{', '}'},
		"reserved opcode":    maskedFrame(0x83, []byte("{}")),
		"long control":       maskedFrame(0x89, bytes.Repeat([]byte("p"), 126)),
		"bad close code":     maskedFrame(0x88, []byte{0x03, 0xEC}), // 1004
		"stray continuation": maskedFrame(0x80, []byte("{}")),
	} {
		t.Run(name, func(t *testing.T) {
			e, srv := testkit.Serve(t, es.Config{})
			c, _, err := websocket.DefaultDialer.Dial(testkit.WSURL(srv), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.UnderlyingConn().Write(frame); err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(wait))
			_, _, err = c.ReadMessage()
			var ce *websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != websocket.CloseProtocolError || ce.Text == "" {
				t.Fatalf("got %v, want close 1002 with a reason", err)
			}
			if n := e.Web.Stats().ProtocolErrors; n != 1 {
				t.Errorf("ProtocolErrors = %d, want 1", n)
			}
		})
	}
}

// maskedFrame is a final client frame: first header byte b0, payload masked.
func maskedFrame(b0 byte, payload []byte) []byte {
	if len(payload) > 125 {
		// Only control frames are made this long here: 16-bit length.
		f := []byte{b0, 0x80 | 126, byte(len(payload) >> 8), byte(len(payload)), 1, 2, 3, 4}
		for i, b := range payload {
			f = append(f, b^byte(i%4+1))
		}
		return f
	}
	f := []byte{b0, 0x80 | byte(len(payload)), 1, 2, 3, 4}
	for i, b := range payload {
		f = append(f, b^byte(i%4+1))
	}
	return f
}
