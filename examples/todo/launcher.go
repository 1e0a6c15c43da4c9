package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
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
// waits. Ctrl-C, or any server stopping, stops them all.
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

	servers := make([]*server, 0, len(o.listen))
	defer func() {
		for _, s := range servers {
			s.stop()
		}
	}()
	exited := make(chan *server, len(o.listen))
	for _, addr := range o.listen {
		s, err := startServer(exe, append(args, "-listen", addr), addr, exited)
		if err != nil {
			return err
		}
		servers = append(servers, s)
	}
	var urls []string
	for _, s := range servers {
		select {
		case url := <-s.ready:
			urls = append(urls, url)
		case <-s.done:
			return fmt.Errorf("the server for %s did not start: %v (its log is above)", s.addr, s.err)
		case <-time.After(startTimeout):
			return fmt.Errorf("the server for %s did not start within %v", s.addr, startTimeout)
		case <-ctx.Done():
			return nil
		}
	}

	fmt.Printf("\n%d todo servers, one database (%s), %s between them:\n\n", len(urls), store, queue)
	for _, url := range urls {
		fmt.Printf("  %s\n", url)
	}
	fmt.Print("\nOpen each in its own window: a list changed in one changes in the others.\nCtrl-C stops everything.\n\n")

	select {
	case <-ctx.Done():
		return nil
	case s := <-exited:
		if s.err != nil {
			return fmt.Errorf("the server for %s stopped: %v", s.addr, s.err)
		}
		return nil // it was stopped (Ctrl-C reaches every process of the terminal)
	}
}

// server is one server process.
type server struct {
	addr  string
	cmd   *exec.Cmd
	stdin io.Closer     // closing it asks the server to stop
	ready chan string   // its URL, once it serves
	done  chan struct{} // closed once it has exited, with err set
	err   error
}

func startServer(exe string, args []string, addr string, exited chan<- *server) (*server, error) {
	s := &server{
		addr:  addr,
		cmd:   exec.Command(exe, args...),
		ready: make(chan string, 1),
		done:  make(chan struct{}),
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
		exited <- s
	}()
	return s, nil
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
