package testkit

import (
	"fmt"
	"io"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/shared"
)

// Tracker is a raw-protocol websocket client for tests with many
// connections or many frames. Instead of queueing frames it keeps, per key,
// the newest version received and the number of frames, and it records every
// frame whose version is older than one already received for its key (a
// breach of per-key order).
type Tracker struct {
	// Conn is the underlying connection; writes go through the Tracker's
	// methods, which serialise them.
	Conn *websocket.Conn
	// Closed is closed when the read loop ends; CloseErr tells why.
	Closed chan struct{}

	t        testing.TB
	progress *Progress
	parse    func([]byte) Row

	writeMu sync.Mutex

	mu        sync.Mutex
	latest    map[shared.EntityKey]int
	frames    map[shared.EntityKey]int
	lastAt    map[shared.EntityKey]time.Time
	total     int
	backwards []string
	foreign   []string
	closeErr  error
}

// TrackerOptions tunes DialTracker.
type TrackerOptions struct {
	// Progress, if set, is signalled after every frame the tracker records
	// and when its connection ends; share one among many trackers and wait on
	// it with Progress.Await.
	Progress *Progress
	// Parse decodes a frame; default ParseRow. Tests with large rows can
	// decode a prefix only.
	Parse func([]byte) Row
	// Dialer dials the connection; default websocket.DefaultDialer.
	Dialer *websocket.Dialer
}

// DialTracker connects a Tracker to a test server's websocket endpoint.
func DialTracker(t testing.TB, srv *httptest.Server, opts TrackerOptions) *Tracker {
	t.Helper()
	return DialTrackerURL(t, WSURL(srv), opts)
}

// WSURL is the websocket endpoint URL of a test server.
func WSURL(srv *httptest.Server) string {
	return "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws/entity-sync/"
}

// DialTrackerURL connects a Tracker to a websocket URL. It may be called
// from any goroutine; it reports a failed dial with t.Errorf and returns nil.
func DialTrackerURL(t testing.TB, url string, opts TrackerOptions) *Tracker {
	t.Helper()
	d := opts.Dialer
	if d == nil {
		d = websocket.DefaultDialer
	}
	conn, _, err := d.Dial(url, nil)
	if err != nil {
		t.Errorf("dial %s: %v", url, err)
		return nil
	}
	tr := &Tracker{
		Conn:     conn,
		Closed:   make(chan struct{}),
		t:        t,
		progress: opts.Progress,
		parse:    opts.Parse,
		latest:   make(map[shared.EntityKey]int),
		frames:   make(map[shared.EntityKey]int),
		lastAt:   make(map[shared.EntityKey]time.Time),
	}
	if tr.parse == nil {
		tr.parse = ParseRow
	}
	go tr.readLoop()
	t.Cleanup(func() { conn.Close(); <-tr.Closed })
	return tr
}

func (tr *Tracker) readLoop() {
	defer close(tr.Closed)
	defer tr.progress.Signal()
	for {
		_, b, err := tr.Conn.ReadMessage()
		if err != nil {
			tr.mu.Lock()
			tr.closeErr = err
			tr.mu.Unlock()
			return
		}
		now := time.Now()
		r := tr.parse(b)
		k := r.Key()
		tr.mu.Lock()
		tr.total++
		if k.Validate() != nil {
			tr.foreign = append(tr.foreign, fmt.Sprintf("%.200q", b))
		} else {
			if last, ok := tr.latest[k]; ok && r.Version < last {
				tr.backwards = append(tr.backwards, fmt.Sprintf("%s: v%d after v%d", k, r.Version, last))
			} else {
				tr.latest[k] = r.Version
			}
			tr.frames[k]++
			tr.lastAt[k] = now
		}
		tr.mu.Unlock()
		tr.progress.Signal()
	}
}

// Subscribe sends a subscribe request for key. Safe from any goroutine;
// returns the write error.
func (tr *Tracker) Subscribe(key shared.EntityKey) error {
	return tr.send(map[string]any{"action": "subscribe", "body": key})
}

// Unsubscribe sends an unsubscribe request for key.
func (tr *Tracker) Unsubscribe(key shared.EntityKey) error {
	return tr.send(map[string]any{"action": "unsubscribe", "body": key})
}

func (tr *Tracker) send(v any) error {
	tr.writeMu.Lock()
	defer tr.writeMu.Unlock()
	_ = tr.Conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	return tr.Conn.WriteJSON(v)
}

// Latest returns the newest version received for key, and whether any frame
// of key arrived.
func (tr *Tracker) Latest(key shared.EntityKey) (int, bool) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	v, ok := tr.latest[key]
	return v, ok
}

// LastAt returns when the last frame of key arrived.
func (tr *Tracker) LastAt(key shared.EntityKey) time.Time {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.lastAt[key]
}

// Frames returns how many frames of key arrived.
func (tr *Tracker) Frames(key shared.EntityKey) int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.frames[key]
}

// TotalFrames returns how many frames arrived in all.
func (tr *Tracker) TotalFrames() int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.total
}

// Backwards lists the frames whose version was older than one already
// received for the same key.
func (tr *Tracker) Backwards() []string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return append([]string(nil), tr.backwards...)
}

// Foreign lists frames that were not rows of a Store.
func (tr *Tracker) Foreign() []string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return append([]string(nil), tr.foreign...)
}

// CloseErr returns why the read loop ended, or nil while it runs.
func (tr *Tracker) CloseErr() error {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.closeErr
}

// Progress is a wake-up shared by many trackers (or any producer of
// events): Signal never blocks, and a waiter re-checks its condition after
// every signal, so no event is missed between a check and the wait.
type Progress struct{ ch chan struct{} }

// NewProgress returns a Progress with no pending signal.
func NewProgress() *Progress { return &Progress{ch: make(chan struct{}, 1)} }

// Signal wakes the waiter, if any; a nil Progress ignores it.
func (p *Progress) Signal() {
	if p == nil {
		return
	}
	select {
	case p.ch <- struct{}{}:
	default:
	}
}

// Await re-evaluates cond after every signal until it returns ok, and fails
// the test with cond's last status after timeout. It returns how long it
// waited. Conditions that depend on something that does not signal (a
// counter of the code under test) need AwaitCond instead.
func (p *Progress) Await(t testing.TB, timeout time.Duration, cond func() (ok bool, status string)) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		ok, status := cond()
		if ok {
			return time.Since(start)
		}
		select {
		case <-p.ch:
		case <-deadline.C:
			if ok, status = cond(); ok {
				return time.Since(start)
			}
			t.Fatalf("timed out after %s: %s", timeout, status)
		}
	}
}

// AwaitCond polls cond every few milliseconds until it holds, failing the
// test with cond's status after timeout: for state that offers no event to
// wait on (a server's counters, its connection count). It returns how long
// it waited.
func AwaitCond(t testing.TB, timeout time.Duration, cond func() (ok bool, status string)) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(timeout)
	for {
		ok, status := cond()
		if ok {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s: %s", timeout, status)
		}
		time.Sleep(5 * time.Millisecond) // polling interval of the check, not a synchronisation point
	}
}

// Logger returns a logger for the code under test: warnings and errors on
// stderr, everything with ES_TEST_VERBOSE set or go test -v.
func Logger() *logrus.Logger {
	l := logrus.New()
	l.SetOutput(os.Stderr)
	l.SetLevel(logrus.WarnLevel)
	if os.Getenv("ES_TEST_VERBOSE") != "" || testing.Verbose() {
		l.SetLevel(logrus.DebugLevel)
	}
	return l
}

// SilentLogger returns a logger that discards everything unless
// ES_TEST_VERBOSE is set: for tests that provoke errors by design (a broker
// restart, a failing fetch function).
func SilentLogger() *logrus.Logger {
	l := Logger()
	if os.Getenv("ES_TEST_VERBOSE") == "" {
		l.SetOutput(io.Discard)
	}
	return l
}
