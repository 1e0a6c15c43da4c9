//go:build linux

// Package childproc is the process plumbing the bench, bench/peer and soak
// programs share: each runs one binary in several roles, with the
// orchestrator role starting the others as child processes of itself.
//
// The convention is: the child is this executable run with -role=NAME; its
// first stdout line is a JSON "hello" (where to reach it, or an "err" field
// saying why it could not start); it exits by itself when its stdin reaches
// EOF (WaitForParent), and it dies with the orchestrator however that ends
// (Pdeathsig, Linux only, hence the build tag).
package childproc

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// DefaultGrace is how long Child.Stop waits, after closing the child's
// stdin, before killing it: long enough for a server to close thousands of
// connections and its broker clients.
const DefaultGrace = 20 * time.Second

// RaiseNOFILE lifts this process's open-file soft limit to the hard limit:
// the benchmark and soak processes hold a socket per client.
func RaiseNOFILE() error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("getrlimit: %w", err)
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return fmt.Errorf("setrlimit NOFILE to %d: %w", lim.Max, err)
		}
	}
	return nil
}

// CPUNanos is this process's user + system CPU time in nanoseconds (not its
// children's), or -1 when it cannot be read. Every server process reports
// it the same way, so the tables compare like with like.
func CPUNanos() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return -1
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

// Child is a process running another role of this executable, started by
// Spawn.
type Child struct {
	// Role is the -role the child was started with, for messages.
	Role string
	// Grace is how long Stop waits after closing stdin before killing the
	// child; Spawn sets DefaultGrace.
	Grace time.Duration

	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan error // receives cmd.Wait's result once
}

// Spawn starts this executable with -role=role followed by args, and
// decodes the child's first stdout line into hello (a pointer) within
// timeout. The child's stderr is this process's; the rest of its stdout is
// discarded.
//
// A hello whose top-level "err" field is set, a child that exits or stays
// silent, or a line that is not JSON is an error; the child is then stopped
// and Spawn returns a nil Child.
func Spawn(role string, timeout time.Duration, hello any, args ...string) (*Child, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, append([]string{"-role=" + role}, args...)...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", role, err)
	}
	c := &Child{Role: role, Grace: DefaultGrace, cmd: cmd, stdin: stdin, done: make(chan error, 1)}
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20) // a hello may list many URLs
		if sc.Scan() {
			lines <- sc.Text()
		} else {
			close(lines)
		}
		// Keep draining so a chatty child never blocks on a full pipe.
		_, _ = io.Copy(io.Discard, stdout)
		c.done <- cmd.Wait()
	}()
	fail := func(err error) (*Child, error) {
		_ = c.Stop()
		return nil, err
	}
	select {
	case line, ok := <-lines:
		if !ok {
			return fail(fmt.Errorf("%s process exited before saying hello", role))
		}
		if err := json.Unmarshal([]byte(line), hello); err != nil {
			return fail(fmt.Errorf("%s process hello %q: %w", role, line, err))
		}
		var refusal struct {
			Err string `json:"err"`
		}
		if json.Unmarshal([]byte(line), &refusal) == nil && refusal.Err != "" {
			return fail(fmt.Errorf("%s process: %s", role, refusal.Err))
		}
		return c, nil
	case <-time.After(timeout):
		return fail(fmt.Errorf("%s process did not say hello within %s", role, timeout))
	}
}

// Stop closes the child's stdin and waits for it to exit, killing it after
// c.Grace. It returns the child's exit error, or an error saying it had to be
// killed. Stop on a nil Child does nothing; call it once.
func (c *Child) Stop() error {
	if c == nil {
		return nil
	}
	_ = c.stdin.Close()
	select {
	case err := <-c.done:
		return err
	case <-time.After(c.Grace):
		_ = c.cmd.Process.Kill()
		<-c.done
		return fmt.Errorf("%s process did not exit within %s of stdin closing; killed", c.Role, c.Grace)
	}
}

// WaitForParent is the child's side: it returns when stdin reaches EOF (the
// orchestrator closed it, or died) or, as a backstop, after lifetime, which
// it reports on stderr.
func WaitForParent(lifetime time.Duration) {
	eof := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(eof)
	}()
	select {
	case <-eof:
	case <-time.After(lifetime):
		fmt.Fprintf(os.Stderr, "%s: child lifetime %s exceeded, exiting\n", filepath.Base(os.Args[0]), lifetime)
	}
}
