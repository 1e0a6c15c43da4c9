//go:build linux

package main

import (
	"bytes"
	"strconv"
)

// The benchmark's one entity: type "bench", id "1". Both systems carry the
// same payload, the entity's row: {"entity":"bench","id":"1","v":123},
// where v is the version the change made. entity-sync sends it as its own
// text frame (the raw dialect); Centrifuge wraps it in its JSON push.
const (
	entityType = "bench"
	entityID   = "1"
	// cfChannel is the Centrifuge channel standing for the same entity.
	cfChannel = "bench:1"
)

// appendPayload appends the entity's row at version v.
func appendPayload(b []byte, v int64) []byte {
	b = append(b, `{"entity":"`+entityType+`","id":"`+entityID+`","v":`...)
	b = strconv.AppendInt(b, v, 10)
	return append(b, '}')
}

var vField = []byte(`"v":`)

// parseVersion finds the payload's version in one message, whatever
// envelope surrounds it; ok is false for a message without one (a
// Centrifuge connect reply or ping). It is a byte search rather than a JSON
// decode to keep the clients process's per-message cost small: it shares
// the machine's cores with the servers it measures.
func parseVersion(msg []byte) (v int64, ok bool) {
	i := bytes.Index(msg, vField)
	if i < 0 {
		return 0, false
	}
	rest := msg[i+len(vField):]
	n := 0
	for n < len(rest) && rest[n] >= '0' && rest[n] <= '9' {
		v = v*10 + int64(rest[n]-'0')
		n++
	}
	return v, n > 0 && n < 19
}
