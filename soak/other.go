//go:build !linux

package main

import (
	"fmt"
	"os"
)

// The soak run signals processes (SIGKILL, SIGSTOP), reads /proc and ties
// its child processes' lives to the orchestrator's (Pdeathsig): Linux only.
func main() {
	fmt.Fprintln(os.Stderr, "soak: runs on Linux only")
	os.Exit(2)
}
