//go:build linux

package main

import (
	"encoding/json"
	"os"
	"time"

	"github.com/entity-sync/entity-sync/internal/childproc"
)

// childLifetime bounds a child process's life even if the orchestrator
// never closes its stdin (it also dies with the orchestrator: Pdeathsig).
const childLifetime = 10 * time.Minute

// hello is a child's first stdout line: where to reach it, or why it could
// not start.
type hello struct {
	WS  string `json:"ws,omitempty"`  // websocket URL (seed, api, cf) or TCP address (floor)
	App string `json:"app,omitempty"` // base URL of the app's write endpoint (seed, api, cf)
	Ctl string `json:"ctl,omitempty"` // control base URL
	Err string `json:"err,omitempty"`
}

// sayHello writes h as the first stdout line; the orchestrator waits for it.
func sayHello(h hello) {
	_ = json.NewEncoder(os.Stdout).Encode(h)
}

// child is a process running another role of this binary, with its hello.
type child struct {
	*childproc.Child
	hello hello
}

// spawn starts this executable with -role=role and waits (up to timeout)
// for its hello line (see childproc.Spawn). The child exits by itself when
// its stdin closes (childproc.WaitForParent).
func spawn(role string, timeout time.Duration, args ...string) (*child, error) {
	c := &child{}
	var err error
	if c.Child, err = childproc.Spawn(role, timeout, &c.hello, args...); err != nil {
		return nil, err
	}
	c.Grace = 15 * time.Second
	return c, nil
}
