//go:build !linux

package main

import (
	"fmt"
	"os"
)

// The benchmark reads Linux process counters (getrusage, RLIMIT_NOFILE) and
// ties its child processes' lives to the orchestrator's (Pdeathsig).
func main() {
	fmt.Fprintln(os.Stderr, "bench: runs on Linux only")
	os.Exit(2)
}
