// Package esweb is the websocket transport: it upgrades HTTP requests on
// /ws/entity-sync/, reads client requests (subscribe, unsubscribe, secret,
// pass-through) and writes each client's updates, one reader and one writer
// goroutine per connection.
//
// A client that stops reading never blocks anyone else: the bridge only ever
// replaces the client's pending update per key, and the writer drops the
// connection when a write does not finish within WriteWait.
package esweb

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/mux"
	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/shared"
)

// Path is where SetupMuxBridge serves the websocket endpoint.
const Path = "/ws/entity-sync/"

// ClientBuilder makes the bridge's view of a new connection;
// (*esbridge.Bridge).ClientBuilder is one.
type ClientBuilder func(ctx context.Context) *esbridge.Client

// Options tunes the transport. Zero values take the documented defaults.
type Options struct {
	// PassThrough receives frames that carry no action. Default: such frames
	// are logged at debug level and dropped.
	PassThrough shared.PassThrough
	// ReadLimit is the largest inbound frame in bytes; a larger one closes
	// the connection with code 1009. Default 32 KiB.
	ReadLimit int64
	// WriteWait bounds one write; a client that does not take a frame within
	// it is disconnected. Default 10s.
	WriteWait time.Duration
	// PongWait is how long the connection may stay silent (no frame, no pong)
	// before it is dropped. Pings go out every 9/10 of it. Default 60s.
	PongWait time.Duration
	// ReadBufferSize and WriteBufferSize size each connection's I/O buffers.
	// Write buffers are pooled between writes. Defaults 1024 each: small
	// buffers keep an idle connection cheap; larger frames are written in
	// several chunks.
	ReadBufferSize, WriteBufferSize int
	// CheckOrigin decides whether a cross-origin upgrade is allowed. Default:
	// only same-origin browsers (requests without an Origin header, from
	// non-browser clients, are allowed).
	CheckOrigin func(r *http.Request) bool
	// Logger receives the transport's log lines. Default: logrus's standard
	// logger.
	Logger logrus.FieldLogger
}

func (o *Options) setDefaults() {
	if o.ReadLimit <= 0 {
		o.ReadLimit = 32 << 10
	}
	if o.WriteWait <= 0 {
		o.WriteWait = 10 * time.Second
	}
	if o.PongWait <= 0 {
		o.PongWait = 60 * time.Second
	}
	if o.ReadBufferSize <= 0 {
		o.ReadBufferSize = 1024
	}
	if o.WriteBufferSize <= 0 {
		o.WriteBufferSize = 1024
	}
	if o.Logger == nil {
		o.Logger = logrus.StandardLogger()
	}
}

// Server is an http.Handler that serves entity-sync websocket connections.
type Server struct {
	build    ClientBuilder
	opts     Options
	log      logrus.FieldLogger
	upgrader websocket.Upgrader
	nextID   atomic.Uint64

	mu     sync.Mutex
	conns  map[*conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// NewServer returns a transport that makes a bridge client per connection
// with build.
func NewServer(build ClientBuilder, opts Options) *Server {
	opts.setDefaults()
	s := &Server{
		build: build,
		opts:  opts,
		log:   opts.Logger.WithField("component", "esweb"),
		conns: make(map[*conn]struct{}),
	}
	s.upgrader = websocket.Upgrader{
		ReadBufferSize:  opts.ReadBufferSize,
		WriteBufferSize: opts.WriteBufferSize,
		WriteBufferPool: &sync.Pool{},
		CheckOrigin:     opts.CheckOrigin,
		Subprotocols:    []string{Subprotocol},
	}
	return s
}

// SetupMuxBridge serves the websocket endpoint at Path on router, as the seed
// did. The optional passThrough receives frames without an action.
func SetupMuxBridge(router *mux.Router, build ClientBuilder, passThrough ...shared.PassThrough) *Server {
	var opts Options
	if len(passThrough) > 0 {
		opts.PassThrough = passThrough[0]
	}
	s := NewServer(build, opts)
	router.Handle(Path, s)
	return s
}

// ServeHTTP upgrades the request to a websocket connection.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		http.Error(w, "entity-sync: server shutting down", http.StatusServiceUnavailable)
		return
	}
	ws, err := s.upgrader.Upgrade(w, r, nil)
	if err != nil {
		// The upgrader has already answered with an HTTP error.
		s.log.WithError(err).WithField("remote", r.RemoteAddr).Debug("websocket upgrade refused")
		return
	}
	id := s.nextID.Add(1)
	c := &conn{
		s:        s,
		ws:       ws,
		log:      s.log.WithFields(logrus.Fields{"conn": id, "remote": r.RemoteAddr}),
		envelope: ws.Subprotocol() == Subprotocol,
		controls: make(chan []byte, maxControlBacklog),
		kicked:   make(chan kick, 1),
		shutdown: make(chan struct{}),
		readDone: make(chan struct{}),
	}
	if c.envelope {
		c.sendControl(welcomeFrame{Type: "welcome", Protocol: Subprotocol, Limits: Limits{MaxFrameBytes: s.opts.ReadLimit}})
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ws.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(2)
	s.mu.Unlock()
	c.client = s.build(context.WithoutCancel(r.Context()))
	go c.writePump()
	go c.readPump()
}

func (s *Server) forget(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// Connections returns the number of open connections.
func (s *Server) Connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Close refuses new connections, sends every client a close frame with code
// 1001 (going away) and waits until every connection's goroutines are gone,
// or ctx ends.
func (s *Server) Close(ctx context.Context) error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		for c := range s.conns {
			close(c.shutdown)
		}
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("esweb: close: connections still open: %w", ctx.Err())
	}
}

// errShutdown marks a connection closed because the server is going away.
var errShutdown = errors.New("server shutting down")
