package esq

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/nsqio/go-nsq"
)

// The pieces of NSQ's TCP protocol that the consumer (nsqConsumer) and the
// producer (producer) both speak: the dial and IDENTIFY, and frames.

const (
	nsqDialTimeout   = time.Second // go-nsq's default; bounds the dial and the handshake together
	nsqWriteTimeout  = time.Second // go-nsq's default
	nsqHeartbeat     = 30 * time.Second
	maxNSQFrameBytes = 16 << 20 // nsqd's --max-msg-size default is 1 MiB
)

// heartbeat is the response nsqd sends an idle client, which must answer
// with a NOP: nsqd closes a connection silent for two heartbeat intervals.
var heartbeat = []byte("_heartbeat_")

// nsqSession is a connection to nsqd past IDENTIFY.
type nsqSession struct {
	nc net.Conn
	r  *bufio.Reader
	w  *bufio.Writer
	// heartbeat is the interval asked of nsqd: a connection silent for
	// twice as long is dead.
	heartbeat time.Duration
	// identified is nsqd's answer to IDENTIFY: JSON with feature
	// negotiation, "OK" from an nsqd without it.
	identified []byte
}

// dialNSQ connects to addr and identifies with fields (see nsqd's IDENTIFY),
// feature negotiation and a heartbeat interval added. The connection's
// deadline is left at the end of the dial timeout, so that the caller's own
// handshake steps are bounded by it too; the caller clears it.
func dialNSQ(addr string, heartbeatInterval time.Duration, fields map[string]any) (*nsqSession, error) {
	// An nsqd that accepts and never answers must not hold the caller for
	// longer than the dial timeout.
	deadline := time.Now().Add(nsqDialTimeout)
	nc, err := (&net.Dialer{Deadline: deadline}).Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := &nsqSession{nc: nc, r: bufio.NewReaderSize(nc, 16<<10), w: bufio.NewWriterSize(nc, 4<<10), heartbeat: heartbeatInterval}
	if s.identified, err = s.identify(deadline, fields); err != nil {
		nc.Close()
		return nil, err
	}
	return s, nil
}

func (s *nsqSession) identify(deadline time.Time, fields map[string]any) ([]byte, error) {
	if err := s.nc.SetDeadline(deadline); err != nil {
		return nil, err
	}
	hostname, _ := os.Hostname()
	all := map[string]any{
		"client_id":           hostname,
		"hostname":            hostname,
		"user_agent":          "entity-sync",
		"feature_negotiation": true,
		"heartbeat_interval":  s.heartbeat.Milliseconds(),
	}
	for k, v := range fields {
		all[k] = v
	}
	identify, err := nsq.Identify(all)
	if err != nil {
		return nil, err
	}
	s.w.Write(nsq.MagicV2)
	if _, err := identify.WriteTo(s.w); err != nil {
		return nil, err
	}
	if err := s.w.Flush(); err != nil {
		return nil, err
	}
	return s.expectResponse("IDENTIFY")
}

// command writes one command and reads nsqd's response to it.
func (s *nsqSession) command(cmd *nsq.Command) ([]byte, error) {
	if _, err := cmd.WriteTo(s.w); err != nil {
		return nil, err
	}
	if err := s.w.Flush(); err != nil {
		return nil, err
	}
	return s.expectResponse(string(cmd.Name))
}

// expectResponse reads one frame and returns its data if it is a response,
// or an error naming the command nsqd refused.
func (s *nsqSession) expectResponse(command string) ([]byte, error) {
	frameType, data, err := readFrame(s.r)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", command, err)
	}
	if frameType != nsq.FrameTypeResponse {
		return nil, fmt.Errorf("%s refused by nsqd: %s", command, data)
	}
	return data, nil
}

// readFrame reads one frame: its size, its type and its data. The data is
// a new slice (the handler may keep a message body).
func readFrame(r *bufio.Reader) (frameType int32, data []byte, err error) {
	var head [8]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return 0, nil, err
	}
	size := int32(binary.BigEndian.Uint32(head[:4]))
	if size < 4 || size > maxNSQFrameBytes {
		return 0, nil, fmt.Errorf("nsqd sent a frame of %d bytes", size)
	}
	data = make([]byte, size-4)
	if _, err := io.ReadFull(r, data); err != nil {
		return 0, nil, err
	}
	return int32(binary.BigEndian.Uint32(head[4:])), data, nil
}

// readLoop reads frames until one fails to read or handle returns an
// error, and returns that error. Heartbeats are answered with nop (the
// caller's writer has its own lock) and not passed to handle. The read
// deadline is pushed back to twice the heartbeat interval at most every
// quarter of it rather than per frame: nsqd writes at least one heartbeat
// per interval, so twice the interval of silence means a dead connection
// either way.
func (s *nsqSession) readLoop(nop func() error, handle func(frameType int32, data []byte) error) error {
	var deadlineSet time.Time
	for {
		if now := time.Now(); now.Sub(deadlineSet) > s.heartbeat/4 {
			if err := s.nc.SetReadDeadline(now.Add(2 * s.heartbeat)); err != nil {
				return err
			}
			deadlineSet = now
		}
		frameType, data, err := readFrame(s.r)
		if err != nil {
			return err
		}
		if frameType == nsq.FrameTypeResponse && bytes.Equal(data, heartbeat) {
			err = nop()
		} else {
			err = handle(frameType, data)
		}
		if err != nil {
			return err
		}
	}
}
