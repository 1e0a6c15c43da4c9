//go:build linux

package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// proc is a child process the orchestrator can start again after killing
// it: same command, same ports, same data directory. Its stderr (and stdout,
// unless hello is read from it) is appended to a log file.
type proc struct {
	name string
	path string
	args []string
	log  string // log file path

	mu     sync.Mutex
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	done   chan struct{} // closed when the current incarnation exited
	starts int
}

// start runs a new incarnation. With hello set, the child's first stdout
// line is decoded into it (within timeout).
func (p *proc) start(hello any, timeout time.Duration) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	f, err := os.OpenFile(p.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(f, "=== %s: start %d\n", time.Now().UTC().Format(time.RFC3339Nano), p.starts+1)
	cmd := exec.Command(p.path, p.args...)
	cmd.Stderr = f
	// The child dies with the orchestrator, however the orchestrator ends.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		f.Close()
		return err
	}
	var stdout io.ReadCloser
	if hello != nil {
		if stdout, err = cmd.StdoutPipe(); err != nil {
			f.Close()
			return err
		}
	} else {
		cmd.Stdout = f
	}
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", p.name, err)
	}
	p.cmd, p.stdin, p.done = cmd, stdin, make(chan struct{})
	p.starts++
	done := p.done
	lines := make(chan string, 1)
	go func() {
		if stdout != nil {
			sc := bufio.NewScanner(stdout)
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			if sc.Scan() {
				lines <- sc.Text()
			}
			close(lines)
			_, _ = io.Copy(f, stdout)
		}
		_ = cmd.Wait()
		fmt.Fprintf(f, "=== %s: exited: %v\n", time.Now().UTC().Format(time.RFC3339Nano), cmd.ProcessState)
		f.Close()
		close(done)
	}()
	if hello == nil {
		return nil
	}
	select {
	case line, ok := <-lines:
		if !ok {
			return fmt.Errorf("%s exited before saying hello (log: %s)", p.name, p.log)
		}
		return json.Unmarshal([]byte(line), hello)
	case <-time.After(timeout):
		return fmt.Errorf("%s did not say hello within %s (log: %s)", p.name, timeout, p.log)
	}
}

// signal sends sig to the current incarnation.
func (p *proc) signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return fmt.Errorf("%s not started", p.name)
	}
	return p.cmd.Process.Signal(sig)
}

// kill SIGKILLs the current incarnation and waits for it to be gone.
func (p *proc) kill() error {
	if err := p.signal(syscall.SIGKILL); err != nil {
		return err
	}
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	select {
	case <-done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%s did not exit within 10s of SIGKILL", p.name)
	}
}

// exited reports whether the current incarnation has ended.
func (p *proc) exited() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done == nil {
		return true
	}
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop ends the current incarnation gracefully (stdin closed, then
// SIGTERM after a while), killing it after grace.
func (p *proc) stop(grace time.Duration) {
	p.mu.Lock()
	cmd, stdin, done := p.cmd, p.stdin, p.done
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGCONT) // in case it is stopped
	_ = stdin.Close()
	select {
	case <-done:
		return
	case <-time.After(grace / 2):
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(grace / 2):
		_ = cmd.Process.Kill()
		<-done
	}
}

// freePorts returns n distinct TCP ports on 127.0.0.1 that were free a
// moment ago.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// waitTCP waits until addr accepts connections.
func waitTCP(addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not accepting connections after %s: %w", addr, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func logPath(dir, name string) string { return filepath.Join(dir, name+".log") }
