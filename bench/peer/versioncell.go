//go:build linux

package main

import (
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// versionCell is the benchmark's "database": one int64, the entity's
// current version, in a small file that every server process maps. With two
// entity-sync servers the publisher bumps it in one process and the server
// holding the clients fetches it in another, as two app servers share a
// real database; a shared mapping keeps that read as cheap as the one-server
// case's, so the fetch costs the same in both topologies.
type versionCell struct {
	mem []byte
	v   *int64
}

// cellSize is one page: the mapping's unit.
const cellSize = 4096

// createCell makes a zeroed cell file at path.
func createCell(path string) error {
	return os.WriteFile(path, make([]byte, cellSize), 0o600)
}

// openCell maps the cell file at path, shared with every other process
// that maps it.
func openCell(path string) (*versionCell, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close() // the mapping outlives the descriptor
	mem, err := syscall.Mmap(int(f.Fd()), 0, cellSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap %s: %w", path, err)
	}
	// The mapping is page-aligned, so the int64 at offset 0 is aligned for
	// atomic access.
	return &versionCell{mem: mem, v: (*int64)(unsafe.Pointer(&mem[0]))}, nil
}

// bump makes the next version and returns it.
func (c *versionCell) bump() int64 { return atomic.AddInt64(c.v, 1) }

// load returns the current version.
func (c *versionCell) load() int64 { return atomic.LoadInt64(c.v) }

func (c *versionCell) close() { _ = syscall.Munmap(c.mem) }
