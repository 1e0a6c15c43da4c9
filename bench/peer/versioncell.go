//go:build linux

package main

import (
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// versionCell is the benchmark's "database": one int64 per entity id, the
// entity's current version, in a small file that every server process
// maps. With two servers the publisher bumps a version in one process and
// the server holding the clients fetches it in another, as two app servers
// share a real database; a shared mapping keeps that read as cheap as the
// one-server case's, so the fetch costs the same in both topologies.
type versionCell struct {
	mem []byte
	v   []int64 // v[id], id in 0..maxKeys
}

// maxKeys is the largest entity id the cell holds.
const maxKeys = 100000

// cellSize is the file's size: maxKeys+1 int64s rounded up to whole pages.
const cellSize = ((maxKeys+1)*8 + 4095) / 4096 * 4096

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
	// The mapping is page-aligned, so every int64 in it is aligned for
	// atomic access.
	return &versionCell{mem: mem, v: unsafe.Slice((*int64)(unsafe.Pointer(&mem[0])), maxKeys+1)}, nil
}

// bump makes entity id's next version and returns it; ids out of range
// use slot 0.
func (c *versionCell) bump(id int) int64 { return atomic.AddInt64(&c.v[c.slot(id)], 1) }

// load returns entity id's current version.
func (c *versionCell) load(id int) int64 { return atomic.LoadInt64(&c.v[c.slot(id)]) }

func (c *versionCell) slot(id int) int {
	if id < 0 || id > maxKeys {
		return 0
	}
	return id
}

func (c *versionCell) close() { _ = syscall.Munmap(c.mem) }
