// Package esweb is the websocket transport: it upgrades HTTP requests on
// /ws/entity-sync/, reads client requests (subscribe, unsubscribe, secret,
// pass-through) and writes each client's updates. A connection has one
// reader goroutine; its frames are encoded once per update and written by
// whoever has them with a write that never waits (the fan-out, mostly), and
// a flusher goroutine runs only while the socket is full. An idle connection
// costs one goroutine and a 256-byte read buffer.
//
// A client that stops reading never blocks anyone else: the bridge only ever
// replaces the client's pending update per key, and the flusher drops the
// connection when its socket takes nothing for WriteWait.
package esweb

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/mux"
	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/shared"
)

// ClientBuilder makes the bridge's view of a new connection;
// (*esbridge.Bridge).ClientBuilder is one.
type ClientBuilder func(ctx context.Context) *esbridge.Client

// Options tunes the transport. Zero values take the documented defaults.
type Options struct {
	// PassThrough receives frames that carry no action, with a context
	// holding the connection (shared.ConnectionFrom: principal, secret,
	// upgrade request). A panic is recovered and logged. Default: such
	// frames are logged at debug level and dropped. (The seed's
	// secret-taking function goes through SetupMuxBridge or
	// entitysync.Config.WSPassThrough.)
	PassThrough func(ctx context.Context, frame []byte)
	// ReadLimit is the largest inbound message in bytes (a fragmented one
	// counts whole); a larger one closes the connection with code 1009.
	// Default 32 KiB.
	ReadLimit int64
	// WriteWait is how long a write may make no progress: a client whose
	// socket takes none of the next 64 KiB within it is disconnected. A
	// client that keeps reading, however slowly next to what waits for it,
	// is not. Default 10s.
	WriteWait time.Duration
	// PongWait is how long the connection may stay silent (no frame, no pong)
	// before it is dropped. Default 60s.
	PongWait time.Duration
	// HeartbeatInterval is how often every connection is pinged, and sent a
	// heartbeat frame in the envelope protocol (browsers hide pings from
	// scripts; the heartbeat lets a client notice a dead connection, see
	// docs/protocol.md). Default 25s, at most 9/10 of PongWait.
	HeartbeatInterval time.Duration
	// ReadBufferSize sizes each connection's read buffer; it does not limit
	// frame sizes. The buffer lives as long as the connection, so its
	// default is small, 256 bytes: client frames are short requests, and a
	// longer one is read in several chunks. (Frames to clients are encoded
	// once per update and written without a per-connection buffer.)
	ReadBufferSize int
	// SendBufferSize is the kernel send buffer (SO_SNDBUF) of each
	// connection, in bytes. Frames the socket has taken can no longer be
	// replaced by a newer state of their key: a small buffer keeps a slow
	// client's backlog in the server's latest-wins queue, so it gets the
	// newest state of a key after at most about a buffer's worth of older
	// frames. Linux would otherwise autotune the buffer up to 4 MiB, seconds
	// of stale frames for a slow client. The cost: one connection's
	// throughput is at most about this size per round trip. Default 128 KiB
	// (Linux doubles the value for its bookkeeping); negative: leave the
	// kernel's autotuning.
	SendBufferSize int
	// Authenticate, if set, checks the upgrade request (cookie, header,
	// token) before the upgrade and returns the principal the hooks will see
	// in shared.Connection. An error refuses the request with 401, or with
	// 403 when it wraps shared.ErrForbidden.
	Authenticate func(r *http.Request) (principal any, err error)
	// AllowedOrigins lists the browser origins, besides the server's own,
	// that may open a connection: exact ("https://app.example.com") or
	// path.Match patterns ("https://*.example.com"). Default: same-origin
	// only. Requests without an Origin header (non-browser clients) are
	// always allowed: the check exists to stop cross-site websocket
	// hijacking, which only browsers can be made to do.
	AllowedOrigins []string
	// AllowAnyOrigin turns the origin check off. Only for endpoints that do
	// not rely on cookies or other ambient browser credentials.
	AllowAnyOrigin bool
	// CheckOrigin, if set, replaces the origin check (AllowedOrigins and
	// AllowAnyOrigin are then ignored).
	CheckOrigin func(r *http.Request) bool
	// MaxConnections bounds the open connections of this server; further
	// upgrade requests get 503. Default 10,000.
	MaxConnections int
	// MaxSubscriptions bounds the keys one connection may hold. Default 1,000.
	MaxSubscriptions int
	// MessagesPerSecond and MessageBurst rate-limit each connection's
	// requests (token bucket). A request over the limit is not dropped: the
	// connection's reads wait for the token, and a connection held back for
	// 10 s in a row is closed with 1008. A secret costs one token per ten
	// subscriptions it re-authorizes. Defaults: 100 per second, and bursts
	// of MaxSubscriptions + MessagesPerSecond, so a page that subscribes to
	// all the keys it may hold at once is never slowed down.
	MessagesPerSecond, MessageBurst int
	// MaxIDLength bounds the id of a key a client may subscribe to, in
	// bytes. Default and maximum shared.MaxIDLength (256).
	MaxIDLength int
	// DisableDiffs makes envelope connections receive every state of a
	// collection key in full ("rows") instead of as a "diff", and never
	// "unchanged" in answer to a subscribe that carries a version; frames
	// still carry their version. For comparing costs and for clients
	// suspected of applying diffs wrongly.
	DisableDiffs bool
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
	if o.HeartbeatInterval <= 0 {
		o.HeartbeatInterval = 25 * time.Second
	}
	o.HeartbeatInterval = min(o.HeartbeatInterval, o.PongWait*9/10)
	if o.ReadBufferSize <= 0 {
		o.ReadBufferSize = 256
	}
	if o.SendBufferSize == 0 {
		o.SendBufferSize = 128 << 10
	}
	if o.Logger == nil {
		o.Logger = logrus.StandardLogger()
	}
	if o.MaxConnections <= 0 {
		o.MaxConnections = 10000
	}
	if o.MaxSubscriptions <= 0 {
		o.MaxSubscriptions = 1000
	}
	if o.MessagesPerSecond <= 0 {
		o.MessagesPerSecond = 100
	}
	if o.MessageBurst <= 0 {
		o.MessageBurst = o.MaxSubscriptions + o.MessagesPerSecond
	}
	if o.MaxIDLength <= 0 || o.MaxIDLength > shared.MaxIDLength {
		o.MaxIDLength = shared.MaxIDLength
	}
}

// Server is an http.Handler that serves entity-sync websocket connections.
type Server struct {
	build    ClientBuilder
	opts     Options
	log      logrus.FieldLogger
	upgrader websocket.Upgrader
	nextID   atomic.Uint64

	mu        sync.Mutex
	conns     map[*conn]struct{}
	upgrading int           // requests past the connection limit check, not yet in conns
	beating   chan struct{} // closed to stop heartbeatLoop; nil while there is no connection
	closed    bool
	closing   chan struct{} // closed by Close: every connection says 1001 and goes
	wg        sync.WaitGroup
	stats     counters

	// openedHook, set by tests, runs in ServeHTTP right after a connection
	// is registered.
	openedHook atomic.Pointer[func()]
}

type counters struct {
	accepted, refusedOrigin, refusedAuth, refusedFull, tooLarge, rateLimited,
	subscriptionLimit, forbidden, slowClients, protocolViolations, protocolErrors atomic.Uint64
}

// Stats counts what the transport accepted and refused since it started.
type Stats struct {
	Connections        int    // open now
	Accepted           uint64 // connections upgraded
	RefusedOrigin      uint64 // upgrades refused by the origin check (403)
	RefusedAuth        uint64 // upgrades refused by Authenticate (401/403)
	RefusedFull        uint64 // upgrades refused at MaxConnections (503)
	FramesTooLarge     uint64 // connections closed with 1009
	RateLimited        uint64 // requests held back until the rate limit allowed them
	SubscriptionLimit  uint64 // subscribes refused at MaxSubscriptions
	Forbidden          uint64 // subscribes refused by Authorize
	SlowClients        uint64 // connections dropped for not reading (write deadline or pending bytes)
	ProtocolViolations uint64 // connections closed with 1008
	ProtocolErrors     uint64 // connections closed with 1002: a frame broke RFC 6455
}

// Stats returns the transport's counters.
func (s *Server) Stats() Stats {
	return Stats{
		Connections:        s.Connections(),
		Accepted:           s.stats.accepted.Load(),
		RefusedOrigin:      s.stats.refusedOrigin.Load(),
		RefusedAuth:        s.stats.refusedAuth.Load(),
		RefusedFull:        s.stats.refusedFull.Load(),
		FramesTooLarge:     s.stats.tooLarge.Load(),
		RateLimited:        s.stats.rateLimited.Load(),
		SubscriptionLimit:  s.stats.subscriptionLimit.Load(),
		Forbidden:          s.stats.forbidden.Load(),
		SlowClients:        s.stats.slowClients.Load(),
		ProtocolViolations: s.stats.protocolViolations.Load(),
		ProtocolErrors:     s.stats.protocolErrors.Load(),
	}
}

// NewServer returns a transport that makes a bridge client per connection
// with build.
func NewServer(build ClientBuilder, opts Options) *Server {
	opts.setDefaults()
	s := &Server{
		build:   build,
		opts:    opts,
		log:     opts.Logger.WithField("component", "esweb"),
		conns:   make(map[*conn]struct{}),
		closing: make(chan struct{}),
	}
	s.upgrader = websocket.Upgrader{
		ReadBufferSize: opts.ReadBufferSize,
		// Only the handshake goes through gorilla's writer (see frame.go),
		// and a pooled buffer is released right after it.
		WriteBufferPool: &sync.Pool{},
		// ServeHTTP checks the origin before authenticating; see originAllowed.
		CheckOrigin:  func(*http.Request) bool { return true },
		Subprotocols: []string{shared.Subprotocol},
	}
	return s
}

// SetupMuxBridge serves the websocket endpoint at Path on router, as the seed
// did. The optional passThrough receives frames without an action.
func SetupMuxBridge(router *mux.Router, build ClientBuilder, passThrough ...shared.PassThrough) *Server {
	var opts Options
	if len(passThrough) > 0 && passThrough[0] != nil {
		opts.PassThrough = SeedPassThrough(passThrough[0])
	}
	s := NewServer(build, opts)
	router.Handle(shared.WebsocketPath, s)
	return s
}

// SeedPassThrough adapts the seed's pass-through function, which takes the
// connection's secret, to Options.PassThrough.
func SeedPassThrough(f shared.PassThrough) func(context.Context, []byte) {
	return func(ctx context.Context, frame []byte) {
		conn, _ := shared.ConnectionFrom(ctx)
		f(conn.Secret(), frame)
	}
}

// ServeHTTP checks the request (server open, connection limit, origin,
// authentication), upgrades it and starts the connection's reader and writer.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	log := s.log.WithField("remote", r.RemoteAddr)
	s.mu.Lock()
	closed, full := s.closed, len(s.conns)+s.upgrading >= s.opts.MaxConnections
	if !closed && !full {
		s.upgrading++ // hold a slot until the connection is registered
	}
	s.mu.Unlock()
	switch {
	case closed:
		http.Error(w, "entity-sync: server shutting down", http.StatusServiceUnavailable)
		return
	case full:
		s.stats.refusedFull.Add(1)
		log.Warnf("refusing connection: %d connections open (MaxConnections)", s.opts.MaxConnections)
		http.Error(w, "entity-sync: too many connections", http.StatusServiceUnavailable)
		return
	}
	// The slot is released here on every way out before the connection is
	// registered; registering moves it from upgrading to conns in the same
	// locked step, so that the connection is never counted twice (a client
	// dialling again right after its upgrade would be refused).
	holding := true
	defer func() {
		if holding {
			s.mu.Lock()
			s.upgrading--
			s.mu.Unlock()
		}
	}()
	if !s.originAllowed(r) {
		s.stats.refusedOrigin.Add(1)
		log.WithField("origin", r.Header.Get("Origin")).Warn("refusing cross-origin websocket request")
		http.Error(w, "entity-sync: origin not allowed", http.StatusForbidden)
		return
	}
	var principal any
	if s.opts.Authenticate != nil {
		p, err := s.opts.Authenticate(r)
		if err != nil {
			s.stats.refusedAuth.Add(1)
			status := http.StatusUnauthorized
			if errors.Is(err, shared.ErrForbidden) {
				status = http.StatusForbidden
			}
			// The hook's error may describe credentials: log it, but tell
			// the client only the status.
			log.WithError(err).Info("refusing unauthenticated websocket request")
			http.Error(w, http.StatusText(status), status)
			return
		}
		principal = p
	}
	ws, err := s.upgrader.Upgrade(w, r, nil)
	if err != nil {
		// The upgrader has already answered with an HTTP error.
		log.WithError(err).Debug("websocket upgrade failed")
		return
	}
	if s.opts.SendBufferSize > 0 {
		setSendBuffer(ws.NetConn(), s.opts.SendBufferSize, log)
	}
	id := strconv.FormatUint(s.nextID.Add(1), 10)
	// From here on the connection's frames are read and written here (see
	// reader.go, frame.go): gorilla's Conn is dropped after the handshake.
	c := &conn{
		s:        s,
		nc:       ws.NetConn(),
		fr:       frameReader{br: bufio.NewReaderSize(ws.NetConn(), s.opts.ReadBufferSize), limit: s.opts.ReadLimit},
		envelope: ws.Subprotocol() == shared.Subprotocol,
		tokens:   float64(s.opts.MessageBurst),
		refilled: time.Now(),
	}
	c.direct = directWriter(c.nc)
	// The client exists before anything (the heartbeat loop, Close) can
	// reach the connection; hooks read its secret through info.
	c.info = shared.NewConnection(id, hookRequest(r), principal, func() string { return c.client.Secret() })
	c.hctx.Context = shared.WithConnection(context.Background(), c.info)
	c.ctx = &c.hctx
	c.client = s.build(c.ctx)
	if c.envelope && !s.opts.DisableDiffs {
		c.client.AcceptDiffs()
	}
	c.client.SetDirect(c.writeNow)
	c.client.OnReady(c.signal)
	s.mu.Lock()
	s.upgrading--
	holding = false
	if s.closed {
		s.mu.Unlock()
		c.hctx.end()
		c.client.Close()
		c.nc.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1) // the reader; each flusher run adds its own
	if s.beating == nil {
		s.beating = make(chan struct{})
		s.wg.Add(1)
		go s.heartbeatLoop(s.beating)
	}
	s.mu.Unlock()
	if hook := s.openedHook.Load(); hook != nil {
		(*hook)()
	}
	s.stats.accepted.Add(1)
	if c.envelope {
		c.sendControl(welcomeFrame{Type: "welcome", Protocol: shared.Subprotocol, Limits: s.limits(),
			HeartbeatMs: s.opts.HeartbeatInterval.Milliseconds()})
	}
	go c.readPump()
}

// setSendBuffer sets nc's kernel send buffer (Options.SendBufferSize), or
// that of the connection under it for TLS.
func setSendBuffer(nc net.Conn, size int, log logrus.FieldLogger) {
	if tc, ok := nc.(interface{ NetConn() net.Conn }); ok {
		nc = tc.NetConn()
	}
	sc, ok := nc.(interface{ SetWriteBuffer(int) error })
	if !ok {
		return // not a socket (a test's pipe, a wrapper): nothing to tune
	}
	if err := sc.SetWriteBuffer(size); err != nil {
		log.WithError(err).Debug("cannot set the connection's send buffer")
	}
}

// hookRequest keeps what the hooks may need of the upgrade request for the
// life of the connection, and lets the rest of it be collected.
func hookRequest(r *http.Request) *http.Request {
	kept := &http.Request{
		Method:     r.Method,
		URL:        r.URL,
		Proto:      r.Proto,
		ProtoMajor: r.ProtoMajor,
		ProtoMinor: r.ProtoMinor,
		Header:     r.Header,
		Host:       r.Host,
		RemoteAddr: r.RemoteAddr,
		RequestURI: r.RequestURI,
		TLS:        r.TLS,
	}
	// Not r.Context(): it would keep the server's per-request context chain
	// alive for every idle connection. What the hooks need of the request's
	// middleware should come through Authenticate's principal.
	return kept
}

// heartbeatLoop pings every connection once per HeartbeatInterval, and sends
// envelope connections a heartbeat frame with it: one timer for the server
// instead of one per connection. It ends when stop is closed.
func (s *Server) heartbeatLoop(stop chan struct{}) {
	defer s.wg.Done()
	ticker := time.NewTicker(s.opts.HeartbeatInterval)
	defer ticker.Stop()
	beat := append(append([]byte(nil), pingFrame...), heartbeatFrame...)
	var conns []*conn
	for {
		select {
		case <-stop:
			return
		case <-ticker.C:
		}
		s.mu.Lock()
		conns = conns[:0]
		for c := range s.conns {
			conns = append(conns, c)
		}
		s.mu.Unlock()
		for _, c := range conns {
			if c.envelope {
				c.send(beat, true)
			} else {
				c.send(pingFrame, true)
			}
		}
		clear(conns)
	}
}

func (s *Server) limits() Limits {
	return Limits{
		MaxFrameBytes:     s.opts.ReadLimit,
		MaxSubscriptions:  s.opts.MaxSubscriptions,
		MessagesPerSecond: s.opts.MessagesPerSecond,
		MessageBurst:      s.opts.MessageBurst,
		MaxIDLength:       s.opts.MaxIDLength,
	}
}

// originAllowed implements the origin policy described on Options.
func (s *Server) originAllowed(r *http.Request) bool {
	if s.opts.CheckOrigin != nil {
		return s.opts.CheckOrigin(r)
	}
	origin := r.Header.Get("Origin")
	if origin == "" || s.opts.AllowAnyOrigin {
		return true
	}
	u, err := url.Parse(origin)
	if err != nil {
		return false
	}
	if strings.EqualFold(u.Host, r.Host) {
		return true
	}
	origin = strings.ToLower(origin)
	for _, pattern := range s.opts.AllowedOrigins {
		if ok, _ := path.Match(strings.ToLower(pattern), origin); ok {
			return true
		}
	}
	return false
}

func (s *Server) forget(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	if len(s.conns) == 0 && s.beating != nil && !s.closed {
		close(s.beating) // no connection, no goroutine; the next one restarts it
		s.beating = nil
	}
	s.mu.Unlock()
}

// Connections returns the number of open connections.
func (s *Server) Connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Close refuses new connections, sends every client a close frame with code
// 1001 (going away) and waits until every connection's goroutines are gone.
// If ctx ends first, the remaining connections are cut without a close
// frame (a client that stopped reading can hold its flusher until
// WriteWait), their hook contexts are cancelled, and Close returns ctx's
// error once their goroutines are gone or after one more second, whichever
// comes first (a hook that ignores its context can hold a reader).
func (s *Server) Close(ctx context.Context) error {
	s.mu.Lock()
	var conns []*conn
	if !s.closed {
		s.closed = true
		for c := range s.conns {
			conns = append(conns, c)
		}
		if s.beating != nil {
			close(s.beating)
			s.beating = nil
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.closeWith(websocket.CloseGoingAway, errShutdown.Error())
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	s.mu.Lock()
	for c := range s.conns {
		c.hctx.end()
		c.end() // unblocks a flusher stuck on a client that does not read
	}
	s.mu.Unlock()
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-done:
		return fmt.Errorf("esweb: close: connections cut before they closed cleanly: %w", ctx.Err())
	case <-t.C:
		return fmt.Errorf("esweb: close: connections cut, some still busy in a hook: %w", ctx.Err())
	}
}

// errShutdown marks a connection closed because the server is going away.
var errShutdown = errors.New("server shutting down")
