//go:build linux

package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/gorilla/websocket"
)

// protocol is what differs between the systems on the client side: the
// subprotocol offered, how a freshly dialled connection gets subscribed to
// its keys, and which keep-alive messages need an answer. Everything after
// the handshake is shared (reader.go).
type protocol interface {
	// subprotocols are offered in the websocket handshake.
	subprotocols() []string
	// handshake subscribes ws to the entities keys and returns once the
	// server has confirmed every subscription, with the newest version
	// seen so far per key (0 if none), in keys' order.
	handshake(ws *websocket.Conn, keys []int) ([]int64, error)
	// keepalive returns the answer a message without a version needs, if
	// any.
	keepalive(msg []byte) []byte
}

// protocolFor names the protocols as the systems' roles: seed (entity-sync's
// raw dialect), api and api-redis (entity-sync's envelope dialect), cf
// (Centrifuge's JSON protocol).
func protocolFor(name string) (protocol, error) {
	switch name {
	case "seed":
		return rawProtocol{}, nil
	case "api", "api-redis":
		return envelopeProtocol{}, nil
	case "cf":
		return cfProtocol{}, nil
	}
	return nil, fmt.Errorf("unknown protocol %q", name)
}

// handshakeTimeout bounds one connection's subscribe round trips.
const handshakeTimeout = 20 * time.Second

// initialStates reads frames until every key has a message carrying its
// version: the subscriptions' initial states. Pushes that arrive meanwhile
// count too (the newest version wins). bad, when set, fails the handshake
// on a message it recognises as a refusal.
func initialStates(ws *websocket.Conn, keys []int, bad func([]byte) bool) ([]int64, error) {
	slot := make(map[int]int, len(keys))
	for i, k := range keys {
		slot[k] = i
	}
	got := make([]int64, len(keys))
	seen := make([]bool, len(keys))
	left := len(keys)
	_ = ws.SetReadDeadline(time.Now().Add(handshakeTimeout))
	defer ws.SetReadDeadline(time.Time{})
	for left > 0 {
		_, frame, err := ws.ReadMessage()
		if err != nil {
			return nil, fmt.Errorf("initial states (%d of %d keys missing): %w", left, len(keys), err)
		}
		for msg := range bytes.SplitSeq(frame, []byte{'\n'}) {
			if bad != nil && bad(msg) {
				return nil, fmt.Errorf("refused: %.200q", msg)
			}
			id, v, ok := parseMsg(msg)
			if !ok {
				continue
			}
			i, ok := slot[id]
			if !ok {
				return nil, fmt.Errorf("a message for entity %d, not subscribed", id)
			}
			if !seen[i] {
				seen[i] = true
				left--
			}
			got[i] = max(got[i], v)
		}
	}
	return got, nil
}

// sendSubscribes sends one subscribe request per key, without waiting for
// the answers; withRef numbers them (the envelope dialect acks them).
func sendSubscribes(ws *websocket.Conn, keys []int, withRef bool) error {
	_ = ws.SetWriteDeadline(time.Now().Add(handshakeTimeout))
	defer ws.SetWriteDeadline(time.Time{})
	b := make([]byte, 0, 96)
	for i, k := range keys {
		b = append(b[:0], `{"action":"subscribe","body":{"entity":"`+entityType+`","id":"`...)
		b = strconv.AppendInt(b, int64(k), 10)
		b = append(b, `"}`...)
		if withRef {
			b = append(b, `,"ref":"`...)
			b = strconv.AppendInt(b, int64(i), 10)
			b = append(b, '"')
		}
		b = append(b, '}')
		if err := ws.WriteMessage(websocket.TextMessage, b); err != nil {
			return err
		}
	}
	return nil
}

// rawProtocol is entity-sync's raw dialect (no subprotocol offered), the
// seed's: a subscribe request per key, and the key's current row arrives
// as a frame of its own, which confirms the subscription.
type rawProtocol struct{}

func (rawProtocol) subprotocols() []string { return nil }

func (rawProtocol) handshake(ws *websocket.Conn, keys []int) ([]int64, error) {
	if err := sendSubscribes(ws, keys, false); err != nil {
		return nil, err
	}
	return initialStates(ws, keys, nil)
}

// entity-sync's keep-alive is websocket ping control frames, which the
// websocket library answers by itself; envelope heartbeats need no answer.
func (rawProtocol) keepalive([]byte) []byte { return nil }

// envelopeProtocol is entity-sync's envelope dialect (entitysync.v1), the
// one its client libraries speak: a welcome frame, then per subscribe an
// ack and a rows frame holding the key's current row.
type envelopeProtocol struct{}

const envelopeName = "entitysync.v1"

func (envelopeProtocol) subprotocols() []string { return []string{envelopeName} }

var envelopeError = []byte(`"type":"error"`)

func (envelopeProtocol) handshake(ws *websocket.Conn, keys []int) ([]int64, error) {
	if ws.Subprotocol() != envelopeName {
		return nil, fmt.Errorf("server answered subprotocol %q, not %s", ws.Subprotocol(), envelopeName)
	}
	if err := sendSubscribes(ws, keys, true); err != nil {
		return nil, err
	}
	return initialStates(ws, keys, func(msg []byte) bool { return bytes.Contains(msg, envelopeError) })
}

func (envelopeProtocol) keepalive([]byte) []byte { return nil }

// cfProtocol is Centrifuge's JSON protocol without a client library: send
// the connect command with the keys in its data; the server subscribes the
// connection to their channels while connecting (OnConnecting in
// server_cf.go) and lists them in the connect reply, which confirms the
// subscriptions. A channel's publications carry no initial state, so a
// key's initial version is that of any push that shares the reply's frame.
type cfProtocol struct{}

func (cfProtocol) subprotocols() []string { return nil }

func (cfProtocol) handshake(ws *websocket.Conn, keys []int) ([]int64, error) {
	data, err := json.Marshal(map[string][]int{"keys": keys})
	if err != nil {
		return nil, err
	}
	connect := append(append([]byte(`{"id":1,"connect":{"data":`), data...), `}}`...)
	_ = ws.SetWriteDeadline(time.Now().Add(handshakeTimeout))
	if err := ws.WriteMessage(websocket.TextMessage, connect); err != nil {
		return nil, err
	}
	_ = ws.SetWriteDeadline(time.Time{})
	_ = ws.SetReadDeadline(time.Now().Add(handshakeTimeout))
	defer ws.SetReadDeadline(time.Time{})
	_, frame, err := ws.ReadMessage()
	if err != nil {
		return nil, fmt.Errorf("connect reply: %w", err)
	}
	// The reply comes first; pushes queued behind it may share its frame.
	reply, rest, _ := bytes.Cut(frame, []byte{'\n'})
	switch {
	case !bytes.HasPrefix(reply, []byte(`{"id":1,`)):
		return nil, fmt.Errorf("connect reply: unexpected frame %.200q", frame)
	case bytes.Contains(reply, []byte(`"error"`)):
		return nil, fmt.Errorf("connect refused: %.200q", reply)
	}
	slot := make(map[int]int, len(keys))
	for i, k := range keys {
		slot[k] = i
		if !bytes.Contains(reply, []byte(`"`+cfChannel(k)+`"`)) {
			return nil, fmt.Errorf("connect reply does not list the server-side subscription to %s", cfChannel(k))
		}
	}
	got := make([]int64, len(keys))
	for msg := range bytes.SplitSeq(rest, []byte{'\n'}) {
		if id, v, ok := parseMsg(msg); ok {
			if i, ok := slot[id]; ok {
				got[i] = max(got[i], v)
			}
		}
	}
	return got, nil
}

// Centrifuge pings with an empty command, {}, and expects {} back when its
// connect reply asked for pongs.
func (cfProtocol) keepalive(msg []byte) []byte {
	if bytes.Equal(msg, []byte("{}")) {
		return []byte("{}")
	}
	return nil
}
