//go:build linux

package main

import (
	"bytes"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// This file is the part of the clients that every system shares: once a
// connection's handshake is done (handshake.go), the same code reads its
// frames, finds the entity and version in each message and records (entity,
// version, receive time). Nothing here knows which system is on the other
// end, so all pay the same client-side cost and are measured by the same
// rules.

// arrival is one message that carried a version: the entity id, the
// version and the UnixNano time its frame was read.
type arrival struct {
	id    int
	v, at int64
}

// wsClient is one websocket connection after its handshake.
type wsClient struct {
	ws    *websocket.Conn
	proto protocol
	keys  []int          // the entity ids subscribed to
	slot  map[int]int    // entity id -> index in keys
	maxV  []atomic.Int64 // newest version received, per key
	dead  atomic.Bool    // the read loop ended without being asked to

	mu       sync.Mutex
	arrivals []arrival // while the fleet records
	frames   int64     // websocket frames that carried a version, while the fleet records
}

// recorder is what the read loops report to: whether to record, and the
// counters of things that should not happen.
type recorder struct {
	recording  atomic.Bool
	closing    atomic.Bool // reads failing now are expected
	readErrors atomic.Int64
	backwards  atomic.Int64 // a version lower than one already received
	strays     atomic.Int64 // messages for an entity the connection did not subscribe to
	others     atomic.Int64 // messages without a version (replies, pings)
	firstErr   atomic.Pointer[string]
}

func (r *recorder) noteErr(err error) {
	s := err.Error()
	r.firstErr.CompareAndSwap(nil, &s)
}

// read is a connection's read loop, until the connection fails or closes.
func (c *wsClient) read(rec *recorder, done func()) {
	defer done()
	buf := make([]byte, 0, 512)
	for {
		_, rd, err := c.ws.NextReader()
		if err == nil {
			buf, err = readAll(rd, buf[:0])
		}
		now := time.Now().UnixNano()
		if err != nil {
			if !rec.closing.Load() {
				c.dead.Store(true)
				rec.readErrors.Add(1)
				rec.noteErr(fmt.Errorf("read: %w", err))
			}
			return
		}
		// A frame holds one message (entity-sync sends each row as its
		// own frame) or several separated by newlines (Centrifuge's JSON
		// protocol batches queued pushes into one frame); each message
		// counts on its own, all with the frame's receive time.
		versions := 0
		for msg := range bytes.SplitSeq(buf, []byte{'\n'}) {
			if len(msg) == 0 {
				continue
			}
			id, v, ok := parseMsg(msg)
			if !ok {
				rec.others.Add(1)
				if reply := c.proto.keepalive(msg); reply != nil {
					_ = c.ws.SetWriteDeadline(time.Now().Add(5 * time.Second))
					_ = c.ws.WriteMessage(websocket.TextMessage, reply)
				}
				continue
			}
			c.received(rec, id, v, now)
			versions++
		}
		if versions > 0 && rec.recording.Load() {
			c.mu.Lock()
			c.frames++
			c.mu.Unlock()
		}
	}
}

// newWSClient is a connection subscribed to keys, holding initial[i] of
// keys[i].
func newWSClient(ws *websocket.Conn, proto protocol, keys []int, initial []int64) *wsClient {
	c := &wsClient{ws: ws, proto: proto, keys: keys, slot: make(map[int]int, len(keys)), maxV: make([]atomic.Int64, len(keys))}
	for i, k := range keys {
		c.slot[k] = i
		c.maxV[i].Store(initial[i])
	}
	return c
}

// received records version v of entity id read at time at.
func (c *wsClient) received(rec *recorder, id int, v, at int64) {
	i, ok := c.slot[id]
	if !ok {
		rec.strays.Add(1)
		return
	}
	if prev := c.maxV[i].Load(); v > prev {
		c.maxV[i].Store(v) // only this connection's read loop stores
	} else if v < prev {
		rec.backwards.Add(1)
	}
	if rec.recording.Load() {
		c.mu.Lock()
		c.arrivals = append(c.arrivals, arrival{id, v, at})
		c.mu.Unlock()
	}
}

// readAll reads one message into buf, growing it as needed, so a
// connection reuses one buffer for all its frames.
func readAll(r io.Reader, buf []byte) ([]byte, error) {
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}
