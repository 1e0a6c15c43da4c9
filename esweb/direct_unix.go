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
func directWriter(nc net.Conn) func([]byte) (int, error) {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return func(b []byte) (n int, err error) {
		// RawConn.Write holds the descriptor's write lock and keeps it open
		// while f runs; f returning true means "done, do not wait for the
		// poller".
		cerr := rc.Write(func(fd uintptr) bool {
			for n < len(b) {
				m, e := syscall.Write(int(fd), b[n:])
				if m > 0 {
					n += m
				}
				switch {
				case e == syscall.EINTR:
					continue
				case e == syscall.EAGAIN:
					return true
				case e != nil:
					err = e
					return true
				case m <= 0:
					return true
				}
			}
			return true
		})
		if err == nil {
			err = cerr
		}
		return n, err
	}
}
