//go:build linux

package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// childLifetime bounds a child process's life even if the orchestrator
// never closes its stdin (it also dies with the orchestrator: Pdeathsig).
const childLifetime = 10 * time.Minute

// raiseNOFILE lifts the open-file soft limit to the hard limit: the clients
// process holds a socket per client, and a server as many.
func raiseNOFILE() error {
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

// cpuNanos is this process's user + system CPU time: the one number the
// tables compare, read the same way in every server process.
func cpuNanos() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return -1
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

// hello is a child's first stdout line: where to reach it, or why it could
// not start.
type hello struct {
	WS  string `json:"ws,omitempty"`  // websocket URL (es, cf) or TCP address (floor)
	Ctl string `json:"ctl,omitempty"` // control base URL
	Err string `json:"err,omitempty"`
}

// sayHello writes h as the first stdout line; the orchestrator waits for it.
func sayHello(h hello) {
	_ = json.NewEncoder(os.Stdout).Encode(h)
}

// child is a process running another role of this binary.
type child struct {
	role  string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan error
	hello hello
}

// spawn starts this executable with -role=role and waits (up to timeout)
// for its hello line. The child dies with the orchestrator (Pdeathsig) and
// exits by itself when its stdin closes (see waitForParent).
func spawn(role string, timeout time.Duration, args ...string) (*child, error) {
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
	c := &child{role: role, cmd: cmd, stdin: stdin, done: make(chan error, 1)}
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		if sc.Scan() {
			lines <- sc.Text()
		} else {
			close(lines)
		}
		_, _ = io.Copy(io.Discard, stdout)
		c.done <- cmd.Wait()
	}()
	select {
	case line, ok := <-lines:
		if !ok {
			c.stop()
			return nil, fmt.Errorf("%s process exited before saying hello", role)
		}
		if err := json.Unmarshal([]byte(line), &c.hello); err != nil {
			c.stop()
			return nil, fmt.Errorf("%s process hello %q: %w", role, line, err)
		}
		if c.hello.Err != "" {
			c.stop()
			return nil, fmt.Errorf("%s process: %s", role, c.hello.Err)
		}
		return c, nil
	case <-time.After(timeout):
		c.stop()
		return nil, fmt.Errorf("%s process did not say hello within %s", role, timeout)
	}
}

// stop closes the child's stdin, waits for it to exit and kills it after
// 15s.
func (c *child) stop() error {
	if c == nil {
		return nil
	}
	_ = c.stdin.Close()
	select {
	case err := <-c.done:
		return err
	case <-time.After(15 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
		return fmt.Errorf("%s process did not exit within 15s of stdin closing; killed", c.role)
	}
}

// waitForParent returns when stdin reaches EOF (the orchestrator closed it
// or died) or after childLifetime.
func waitForParent() {
	eof := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(eof)
	}()
	select {
	case <-eof:
	case <-time.After(childLifetime):
		fmt.Fprintln(os.Stderr, "peer: child lifetime exceeded, exiting")
	}
}
