//go:build linux

package main

import (
	"bytes"
	"strconv"
)

// The benchmark's entities are of type "bench", with numeric ids (the peer
// phase uses id 1 only, the many-keys phase ids 1..keys). Every system
// carries the same payload, the entity's row:
// {"entity":"bench","id":"12","v":123}, where v is the version the change
// made. entity-sync sends it as its own text frame (raw dialect) or inside
// a rows envelope; Centrifuge wraps it in its JSON push on the channel
// "bench:12".
const entityType = "bench"

// cfChannel is the Centrifuge channel standing for entity id.
func cfChannel(id int) string { return "bench:" + strconv.Itoa(id) }

// appendPayload appends entity id's row at version v.
func appendPayload(b []byte, id int, v int64) []byte {
	b = append(b, `{"entity":"`+entityType+`","id":"`...)
	b = strconv.AppendInt(b, int64(id), 10)
	b = append(b, `","v":`...)
	b = strconv.AppendInt(b, v, 10)
	return append(b, '}')
}

var (
	idField = []byte(`"id":"`)
	vField  = []byte(`"v":`)
)

// parseMsg finds the entity id and the payload's version in one message,
// whatever envelope surrounds it; ok is false for a message without them
// (a Centrifuge connect reply or ping, an envelope ack, welcome or
// heartbeat). The first "id" is the key's in every envelope (entity-sync's
// key object, or the row itself). It is a byte search rather than a JSON
// decode to keep the clients process's per-message cost small: it shares
// the machine's cores with the servers it measures.
func parseMsg(msg []byte) (id int, v int64, ok bool) {
	i := bytes.Index(msg, idField)
	if i < 0 {
		return 0, 0, false
	}
	id, n := digits(msg[i+len(idField):])
	if n == 0 {
		return 0, 0, false
	}
	j := bytes.Index(msg, vField)
	if j < 0 {
		return 0, 0, false
	}
	vv, m := digits(msg[j+len(vField):])
	return id, int64(vv), m > 0
}

// digits reads a decimal number of at most 18 digits at the start of b and
// returns it with the number of digits read (0: none, or too many).
func digits(b []byte) (int, int) {
	v, n := 0, 0
	for n < len(b) && b[n] >= '0' && b[n] <= '9' {
		v = v*10 + int(b[n]-'0')
		n++
	}
	if n >= 19 {
		return 0, 0
	}
	return v, n
}
