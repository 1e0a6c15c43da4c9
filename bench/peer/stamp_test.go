//go:build linux

package main

import (
	"net"
	"syscall"
	"testing"
)

// TestStampConn checks that both of entity-sync's ways to write to a
// socket are stamped while recording, and only then: Write, and a raw
// descriptor write through SyscallConn (the direct path, which the
// wrapper must keep offering).
func TestStampConn(t *testing.T) {
	st := newStamps()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sl := st.listener(l)
	defer sl.Close()
	client, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := sl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()

	rawWrite := func() {
		t.Helper()
		sc, ok := server.(syscall.Conn)
		if !ok {
			t.Fatal("the wrapped connection does not offer SyscallConn: entity-sync would lose its direct writes")
		}
		rc, err := sc.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		if err := rc.Write(func(fd uintptr) bool { _, _ = syscall.Write(int(fd), []byte("x")); return true }); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := server.Write([]byte("not recorded")); err != nil {
		t.Fatal(err)
	}
	st.recording.Store(true)
	if _, err := server.Write([]byte("a")); err != nil {
		t.Fatal(err)
	}
	rawWrite()
	st.recording.Store(false)
	rawWrite()

	got := st.conns[client.LocalAddr().String()]
	if got == nil {
		t.Fatalf("no writes recorded under the client's address %s", client.LocalAddr())
	}
	if len(got.at) != 2 || got.at[0] > got.at[1] {
		t.Errorf("stamps %v, want two in order", got.at)
	}
}
