//go:build unix

package esweb

import (
	"net"
	"syscall"
)

// directWriter returns a function that writes to nc without ever waiting:
// it writes what the socket buffer takes and returns how much that was. The
// fan-out uses it to put a frame on the wire from its own goroutine, with no
// writer goroutine to wake and no deadline to arm; whatever does not fit is
// left to the connection's flusher. It returns nil for a connection that is
// not a plain socket (TLS, a wrapped net.Conn): those are written by the
// flusher alone.
//
// The function is not safe for concurrent use: the connection's wmu makes
// its writes take turns.
func directWriter(nc net.Conn) func([]byte) (int, error) {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	w := &rawWriter{rc: rc}
	w.writeFD = w.writeTo
	return w.write
}

// rawWriter is directWriter's state. A write hands RawConn.Write a function
// made once per connection, and keeps the frame and the outcome in fields:
// a closure made per write, capturing its results, would cost three
// allocations per frame written, the fan-out's most frequent call.
type rawWriter struct {
	rc      syscall.RawConn
	writeFD func(fd uintptr) bool // w.writeTo, bound once

	b   []byte // the frame being written, during a write
	n   int
	err error
}

func (w *rawWriter) write(b []byte) (int, error) {
	w.b, w.n, w.err = b, 0, nil
	// RawConn.Write holds the descriptor's write lock and keeps it open
	// while writeFD runs.
	cerr := w.rc.Write(w.writeFD)
	n, err := w.n, w.err
	w.b, w.err = nil, nil // keep no frame alive
	if err == nil {
		err = cerr
	}
	return n, err
}

// writeTo writes as much of w.b as the socket takes now. It always returns
// true: "done, do not wait for the poller".
func (w *rawWriter) writeTo(fd uintptr) bool {
	for w.n < len(w.b) {
		m, e := syscall.Write(int(fd), w.b[w.n:])
		if m > 0 {
			w.n += m
		}
		switch {
		case e == syscall.EINTR:
			continue
		case e == syscall.EAGAIN:
			return true
		case e != nil:
			w.err = e
			return true
		case m <= 0:
			return true
		}
	}
	return true
}
