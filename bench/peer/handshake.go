//go:build linux

package main

import (
	"bytes"
	"errors"
	"fmt"
	"time"

	"github.com/gorilla/websocket"
)

// protocol is what differs between the two systems on the client side: how
// a freshly dialled connection gets subscribed, and which keep-alive
// messages need an answer. Everything after the handshake is shared
// (reader.go).
type protocol interface {
	// handshake subscribes ws to the benchmark's entity and returns once
	// the server has confirmed it, with the newest version seen so far (0
	// if none).
	handshake(ws *websocket.Conn) (int64, error)
	// keepalive returns the answer a message without a version needs, if
	// any.
	keepalive(msg []byte) []byte
}

// protocolFor names the two systems as the orchestrator does.
func protocolFor(name string) (protocol, error) {
	switch name {
	case "es":
		return esProtocol{}, nil
	case "cf":
		return cfProtocol{}, nil
	}
	return nil, fmt.Errorf("unknown protocol %q", name)
}

// handshakeTimeout bounds one connection's subscribe round trip.
const handshakeTimeout = 10 * time.Second

// esProtocol is entity-sync's raw dialect (no subprotocol offered): send a
// subscribe request, and the entity's current row arrives as the first
// frame, which confirms the subscription.
type esProtocol struct{}

var esSubscribe = []byte(`{"action":"subscribe","body":{"entity":"` + entityType + `","id":"` + entityID + `"}}`)

func (esProtocol) handshake(ws *websocket.Conn) (int64, error) {
	_ = ws.SetWriteDeadline(time.Now().Add(handshakeTimeout))
	if err := ws.WriteMessage(websocket.TextMessage, esSubscribe); err != nil {
		return 0, err
	}
	_ = ws.SetReadDeadline(time.Now().Add(handshakeTimeout))
	defer ws.SetReadDeadline(time.Time{})
	_, msg, err := ws.ReadMessage()
	if err != nil {
		return 0, fmt.Errorf("initial state: %w", err)
	}
	v, ok := parseVersion(msg)
	if !ok {
		return 0, fmt.Errorf("initial state: unexpected frame %.100q", msg)
	}
	return v, nil
}

// entity-sync's keep-alive is websocket ping control frames, which the
// websocket library answers by itself.
func (esProtocol) keepalive([]byte) []byte { return nil }

// cfProtocol is Centrifuge's JSON protocol without a client library: send
// the connect command; the server subscribes the connection to the
// entity's channel while connecting (OnConnecting in server_cf.go) and
// lists it in the connect reply, which confirms the subscription.
type cfProtocol struct{}

var cfConnect = []byte(`{"id":1,"connect":{}}`)

func (cfProtocol) handshake(ws *websocket.Conn) (int64, error) {
	_ = ws.SetWriteDeadline(time.Now().Add(handshakeTimeout))
	if err := ws.WriteMessage(websocket.TextMessage, cfConnect); err != nil {
		return 0, err
	}
	_ = ws.SetReadDeadline(time.Now().Add(handshakeTimeout))
	defer ws.SetReadDeadline(time.Time{})
	_, frame, err := ws.ReadMessage()
	if err != nil {
		return 0, fmt.Errorf("connect reply: %w", err)
	}
	// The reply comes first; pushes queued behind it may share its frame.
	reply, rest, _ := bytes.Cut(frame, []byte{'\n'})
	switch {
	case !bytes.HasPrefix(reply, []byte(`{"id":1,`)):
		return 0, fmt.Errorf("connect reply: unexpected frame %.200q", frame)
	case bytes.Contains(reply, []byte(`"error"`)):
		return 0, fmt.Errorf("connect refused: %.200q", reply)
	case !bytes.Contains(reply, []byte(`"`+cfChannel+`"`)):
		return 0, errors.New("connect reply does not list the server-side subscription")
	}
	var newest int64
	for msg := range bytes.SplitSeq(rest, []byte{'\n'}) {
		if v, ok := parseVersion(msg); ok {
			newest = max(newest, v)
		}
	}
	return newest, nil
}

// Centrifuge pings with an empty command, {}, and expects {} back when its
// connect reply asked for pongs.
func (cfProtocol) keepalive(msg []byte) []byte {
	if bytes.Equal(msg, []byte("{}")) {
		return []byte("{}")
	}
	return nil
}
