//go:build !linux

package main

import (
	"fmt"
	"os"
)

// The benchmark reads Linux process counters (getrusage, RLIMIT_NOFILE),
// maps a shared file and ties its child processes' lives to the
// orchestrator's (Pdeathsig).
func main() {
	fmt.Fprintln(os.Stderr, "peer: runs on Linux only")
	os.Exit(2)
}
