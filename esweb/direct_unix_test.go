//go:build unix

package esweb

import (
	"bytes"
	"io"
	"net"
	"testing"
)

// The fan-out writes a frame per subscriber per change through the direct
// writer: a write must allocate nothing.
func TestDirectWriteAllocatesNothing(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()

	write := directWriter(server)
	if write == nil {
		t.Fatal("no direct writer for a TCP connection")
	}
	frame := []byte("\x81\x05hello")
	const runs = 200
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(client, int64(len(frame)*(runs+2))))
		got <- b
	}()
	if n, err := write(frame); n != len(frame) || err != nil { // warm up
		t.Fatalf("write: %d, %v", n, err)
	}
	allocs := testing.AllocsPerRun(runs, func() {
		if n, err := write(frame); n != len(frame) || err != nil {
			t.Fatalf("write: %d, %v", n, err)
		}
	})
	if allocs != 0 {
		t.Errorf("a direct write allocates %.1f times, want 0", allocs)
	}
	if b := <-got; !bytes.Equal(b, bytes.Repeat(frame, runs+2)) {
		t.Errorf("the reader got %d bytes, not the %d frames written in order", len(b), runs+2)
	}
}
