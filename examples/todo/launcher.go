package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	neturl "net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/entity-sync/entity-sync/internal/nsqtest"
)

// startTimeout bounds how long a server may take to start serving.
const startTimeout = time.Minute

// launch starts one server process per -listen address (this same program,
// with -serve), all sharing the database and a queue, prints their URLs and
// waits, restarting a server that dies. Ctrl-C stops them all.
func launch(ctx context.Context, o options) error {
	args := []string{"-serve", "-launched"}
	var store, queue string
	if o.pg != "" {
		// The database is the queue too: LISTEN/NOTIFY.
		args = append(args, "-pg", o.pg)
		store, queue = "PostgreSQL", "Postgres LISTEN/NOTIFY"
	} else {
		// A real nsqd, run inside this process on a free port with its
		// data in a temporary directory that Close removes.
		broker, err := nsqtest.Embed()
		if err != nil {
			return fmt.Errorf("start nsqd: %w", err)
		}
		defer broker.Close()
		args = append(args, "-data", o.data, "-nsqd", broker.TCPAddr())
		store = "SQLite " + filepath.Join(o.data, "todo.db")
		queue = "NSQ (nsqd " + broker.TCPAddr() + ", in this process)"
	}
	if o.debug {
		args = append(args, "-debug")
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}

	quit := make(chan struct{}) // ends the servers' exit reports once launch returns
	defer close(quit)
	exited := make(chan *server)
	servers := make([]*server, len(o.listen))
	defer func() {
		for _, s := range servers {
			if s != nil {
				s.stop()
			}
		}
	}()
	for i, addr := range o.listen {
		s, err := startServer(exe, args, addr, i, exited, quit)
		if err != nil {
			return err
		}
		servers[i] = s
	}
	var urls []string
	for _, s := range servers {
		url, err := s.awaitReady(ctx)
		if err != nil || url == "" {
			return err
		}
		urls = append(urls, url)
	}

	fmt.Printf("\n%d todo servers, one database (%s), %s between them:\n\n", len(urls), store, queue)
	for _, url := range urls {
		fmt.Printf("  %s\n", url)
	}
	fmt.Print("\nOpen each in its own window: a list changed in one changes in the others.\nCtrl-C stops everything.\n\n")

	// A server that dies is started again on its address, so that the demo
	// survives it: the other servers go on serving meanwhile, and the dead
	// one's pages reconnect once it is back. One that dies soon after it
	// started is restarted after a growing pause, so a server that cannot
	// run does not spin.
	delay := make([]time.Duration, len(servers))
	for {
		var s *server
		select {
		case <-ctx.Done():
			return nil
		case s = <-exited:
		}
		if s.err == nil {
			return nil // it was stopped (Ctrl-C reaches every process of the terminal)
		}
		addr := restartAddr(s.addr, urls[s.index])
		if time.Since(s.started) >= restartCalm {
			delay[s.index] = 0
		}
		if delay[s.index] == 0 {
			fmt.Printf("todo: the server for %s stopped (%v); restarting it\n", addr, s.err)
		} else {
			fmt.Printf("todo: the server for %s stopped (%v) %v after it started; restarting it in %v\n",
				addr, s.err, time.Since(s.started).Round(time.Millisecond), delay[s.index])
		}
		servers[s.index] = nil
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(delay[s.index]):
		}
		delay[s.index] = min(max(2*delay[s.index], time.Second), maxRestartDelay)
		next, err := startServer(exe, args, addr, s.index, exited, quit)
		if err != nil {
			return err
		}
		servers[s.index] = next
		select {
		case url := <-next.ready:
			fmt.Printf("todo: the server for %s serves again at %s\n", addr, url)
		case <-next.done: // reported on exited: restarted after a pause
		case <-time.After(startTimeout):
			return fmt.Errorf("the server for %s did not start again within %v", addr, startTimeout)
		case <-ctx.Done():
			return nil
		}
	}
}

// restartAddr is the address to start a server again on: the host it was
// given (an address on every interface stays so) and the port it got (which
// may have been chosen by the system, for port 0), so that its pages find it
// again.
func restartAddr(listen, url string) string {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return listen
	}
	u, err := neturl.Parse(url)
	if err != nil || u.Port() == "" {
		return listen
	}
	return net.JoinHostPort(host, u.Port())
}

const (
	// restartCalm is how long a server must have run for its death to be
	// restarted at once.
	restartCalm = 10 * time.Second
	// maxRestartDelay bounds the pause before restarting a server that keeps
	// dying.
	maxRestartDelay = 30 * time.Second
)

// server is one server process.
type server struct {
	addr    string
	index   int // its place in -listen
	started time.Time
	cmd     *exec.Cmd
	stdin   io.Closer     // closing it asks the server to stop
	ready   chan string   // its URL, once it serves
	done    chan struct{} // closed once it has exited, with err set
	err     error
}

// startServer starts the server process for addr; once it exits, it is
// sent on exited (until quit closes).
func startServer(exe string, args []string, addr string, index int, exited chan<- *server, quit <-chan struct{}) (*server, error) {
	s := &server{
		addr:    addr,
		index:   index,
		started: time.Now(),
		cmd:     exec.Command(exe, append(args[:len(args):len(args)], "-listen", addr)...),
		ready:   make(chan string, 1),
		done:    make(chan struct{}),
	}
	s.cmd.Stderr = os.Stderr // its log
	stdin, err := s.cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	s.stdin = stdin
	// Its stdout is its URL, when ready (a pipe of our own, so that reading
	// it does not race exec's Wait).
	out, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	s.cmd.Stdout = w
	err = s.cmd.Start()
	w.Close()
	if err != nil {
		out.Close()
		return nil, fmt.Errorf("start the server for %s: %w", s.addr, err)
	}
	go func() {
		defer out.Close()
		lines := bufio.NewScanner(out)
		if lines.Scan() {
			s.ready <- strings.TrimSpace(lines.Text())
		}
		_, _ = io.Copy(os.Stdout, out) // anything else it prints
	}()
	go func() {
		s.err = s.cmd.Wait()
		close(s.done)
		select {
		case exited <- s:
		case <-quit:
		}
	}()
	return s, nil
}

// awaitReady waits until the server serves and returns its URL; "" if ctx
// ended first.
func (s *server) awaitReady(ctx context.Context) (string, error) {
	select {
	case url := <-s.ready:
		return url, nil
	case <-s.done:
		return "", fmt.Errorf("the server for %s did not start: %v (its log is above)", s.addr, s.err)
	case <-time.After(startTimeout):
		return "", fmt.Errorf("the server for %s did not start within %v", s.addr, startTimeout)
	case <-ctx.Done():
		return "", nil
	}
}

// stop asks the server to shut down gracefully (it logs any trouble itself)
// and waits; past the server's own shutdown timeout, it kills it.
func (s *server) stop() {
	s.stdin.Close()
	select {
	case <-s.done:
	case <-time.After(shutdownTimeout + 5*time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}
