package esq

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/shared"
)

// DetectLoss wraps q so that a subscriber notices when the broker drops
// messages silently, and resyncs: NSQ discards whatever overflows an
// ephemeral channel's memory queue (nsqd's --mem-queue-size, 10,000 by
// default) while a server is paused or saturated, and says nothing.
//
// Publish stamps each message, a JSON object, with one more field naming the
// publisher (an id per DetectLoss call: its start time and random digits) and
// a sequence number per entity type starting at 1:
//
//	{"entity":"items","id":"100","_es":{"p":"19ac0e4f7a2-9f2c41d07be36a58","n":42}}
//
// Decoders that ignore unknown fields (encoding/json's default) still see the
// key; subscribers receive the stamped body. A body that is not a non-empty
// JSON object is published as it is, unstamped. Once a publisher has been
// quiet on an entity type for 200 ms (the mark goes out 200 to 400 ms after
// its last publish), it sends a mark, the stamp alone ({"_es":{...}})
// carrying the last sequence number used, and again about 2 s, 15 s and 60 s
// after the last publish in case a mark is itself dropped. Nothing is sent
// while nobody publishes.
//
// Subscribe's wrapper tracks, per entity type and publisher, the highest
// number received. A number beyond the next one leaves a hole; a hole still
// open after a second's grace (messages published concurrently may arrive
// a little out of order), or below the number of a mark that arrives, means
// messages were lost: onLoss is called, once for every hole open at that
// moment, of every publisher (the resync it starts covers them all).
//
// The grace is a second in which the subscription could have received the
// missing message: a late message may be waiting behind one that onMessage
// is slow to handle, or for a goroutine the scheduler of a loaded machine
// does not run. So it counts from when the hole opened or, if later, from
// when the subscription last stalled: when onMessage returns from a call
// that took over 100 ms, or when the timer that checks the holes runs over
// 100 ms late (the process itself was not running). A hole is not judged
// while onMessage has been running for over 100 ms, and is a loss 10 seconds
// after it opened in any case, however slow onMessage is. Numbers at or below
// the highest (late or duplicate messages) are passed on and fill their hole.
// The first message or mark heard from a publisher opens no hole, unless the
// publisher started after the subscription (the publisher id begins with its
// start time): then every number from 1 should have arrived, and those below
// the first one heard are a hole like any other. That is how a server that
// restarted, and whose first notifications were lost on their way to this
// one, is noticed (before, the first it heard of the new publisher looked
// like any other start). A publisher's clock running ahead makes that a
// resync too many; one running behind, a loss missed as before. Marks never
// reach onMessage. Messages without a stamp (the plain key, e.g. from a
// producer outside Go) are passed on untracked. The wrapped queue's own
// onLoss calls are passed on unchanged (they cover the open holes too).
// onLoss may be called from a timer goroutine, concurrently with onMessage,
// as the NSQ queue already does.
//
// Each loss is logged as a warning on log (nil: logrus's standard logger),
// with how many messages went missing: a capacity signal (raise nsqd's
// --mem-queue-size, or find what stalls the server).
//
// At most 4,096 holes are tracked per entity type: beyond that, the numbers
// of a new hole are not recorded, and they count as lost once the grace of
// the first of them to go untracked has passed (a late message cannot fill
// them).
//
// Whoever can publish on the broker can forge stamps, so what a subscription
// keeps and does for them is bounded: at most 1,024 publishers are tracked
// per entity type (a new one makes it forget the one heard from least
// recently, whose open holes then count as lost once grace has passed), a
// publisher id longer than 64 bytes is not tracked at all (its messages are
// passed on as unstamped ones, its marks dropped; logged once), and onLoss
// is called at most once per 5 seconds per entity type: a loss found sooner
// after the last call waits for the end of those 5 seconds, and the one call
// then covers every loss found meanwhile.
//
// Publishers not heard from for an hour are forgotten. Close stops every timer
// and waits for the marks being sent. Wrapping a queue DetectLoss returned
// returns it unchanged, and so is the in-process queue (*Memory): it hands
// every message to its subscriber within Publish and cannot lose one, so
// there is nothing to detect (with many concurrent writers its messages
// overtake each other, which detection would only have to tolerate).
//
// A queue that routes by key (see Routing) is returned unchanged too: a
// server that hears only the keys it watches would see every other key's
// sequence numbers as holes. Such a queue reports its own losses (a
// reconnect, a slow consumer).
func DetectLoss(q Queue, log logrus.FieldLogger) Queue {
	switch q := q.(type) {
	case *lossDetector:
		return q
	case *Memory:
		return q
	}
	if Routing(q) != nil {
		return q
	}
	d := newLossDetector(q, defaultLossTiming)
	if log != nil {
		d.log = log.WithField("component", "esq.detectloss")
	}
	return d
}

// lossTiming holds DetectLoss's delays; tests shorten them.
type lossTiming struct {
	// marks is the marks' schedule: the first once the publisher has been
	// quiet on the entity type for marks[0] (checked every marks[0]), each
	// next one marks[i]-marks[i-1] after the previous.
	marks []time.Duration
	// grace is how long a hole may wait for late messages, counted from
	// when it opened or the subscription last stalled.
	grace time.Duration
	// stall is the longest onMessage call, and the most the grace timer
	// may run late, that is not a stall of the subscription.
	stall time.Duration
	// maxGrace is how long a hole may wait however often the subscription
	// stalls.
	maxGrace time.Duration
	// forget is how long a silent publisher is remembered (between one and
	// two times forget).
	forget time.Duration
	// maxHoles bounds the holes tracked per subscription (entity type),
	// across publishers: the numbers of a hole beyond it are not recorded
	// and count as lost once grace has passed.
	maxHoles int
	// maxPublishers bounds the publishers tracked per subscription.
	maxPublishers int
	// resyncEvery is the least time between two onLoss calls of a
	// subscription that the detector makes (the wrapped queue's own are
	// passed on at once).
	resyncEvery time.Duration
}

// maxPublisherID is the longest publisher id tracked, in bytes; the
// detector's own are 28.
const maxPublisherID = 64

var defaultLossTiming = lossTiming{
	marks:         []time.Duration{200 * time.Millisecond, 2 * time.Second, 15 * time.Second, 60 * time.Second},
	grace:         time.Second,
	stall:         100 * time.Millisecond,
	maxGrace:      10 * time.Second,
	forget:        time.Hour,
	maxHoles:      4096,
	maxPublishers: 1024,
	resyncEvery:   5 * time.Second,
}

type lossDetector struct {
	q      Queue
	log    logrus.FieldLogger
	id     string
	timing lossTiming
	ctx    context.Context // cancelled by Close: bounds the marks' publishes
	cancel context.CancelFunc

	mu     sync.RWMutex
	closed bool
	topics map[shared.EntityType]*seqTopic
	subs   []*seqSub

	// running counts timer callbacks at work (sending a mark, calling
	// onLoss). A callback joins it under its topic's or subscription's lock
	// after checking that Close has not marked it closed, so every Add
	// happens before Close's Wait.
	running sync.WaitGroup
}

func newLossDetector(q Queue, timing lossTiming) *lossDetector {
	r, err := randomHex(8)
	if err != nil {
		// crypto/rand does not fail on the platforms Go supports; a fixed
		// id would still work for one publisher.
		r = "0000000000000000"
	}
	// The id starts with the publisher's start time, so that a subscriber
	// can tell a publisher that started after it (see DetectLoss).
	id := publisherID(time.Now(), r)
	ctx, cancel := context.WithCancel(context.Background())
	return &lossDetector{q: q, id: id, timing: timing, ctx: ctx, cancel: cancel,
		log:    logrus.StandardLogger().WithField("component", "esq.detectloss"),
		topics: make(map[shared.EntityType]*seqTopic)}
}

// seqTopic is a publisher's sequence on one entity type.
type seqTopic struct {
	d      *lossDetector
	entity shared.EntityType

	mu       sync.Mutex
	n        uint64 // last sequence number given out
	inflight int    // publishes not returned yet
	marked   uint64 // n when the marks' schedule (re)started
	sent     int    // marks sent since then
	timer    *time.Timer
	armed    bool
	closed   bool
}

func (d *lossDetector) topic(entity shared.EntityType) (*seqTopic, error) {
	d.mu.RLock()
	t, ok := d.topics[entity]
	closed := d.closed
	d.mu.RUnlock()
	if ok && !closed {
		return t, nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, ErrClosed
	}
	t, ok = d.topics[entity]
	if !ok {
		t = &seqTopic{d: d, entity: entity}
		d.topics[entity] = t
	}
	return t, nil
}

// stampBytes is the most a stamp with publisher id id adds to a message:
// `,"_es":{"p":"<id>","n":<up to 20 digits>}`.
func stampBytes(id string) int {
	return 1 + len(stampKey) + len(id) + len(stampN) + 20 + 1
}

// MaxMessageBytes is the wrapped queue's limit less the stamp, or 0 when it
// has none.
func (d *lossDetector) MaxMessageBytes() int {
	if n := MaxMessageBytes(d.q); n > 0 {
		return max(n-stampBytes(d.id), 1)
	}
	return 0
}

// Publish stamps body with the next sequence number of the entity type and
// publishes it on the wrapped queue.
func (d *lossDetector) Publish(ctx context.Context, entity shared.EntityType, body []byte) error {
	at, ok := stampAt(body)
	if !ok {
		return d.q.Publish(ctx, entity, body)
	}
	t, err := d.topic(entity)
	if err != nil {
		return err
	}
	t.mu.Lock()
	t.n++
	n := t.n
	t.inflight++
	t.mu.Unlock()

	err = d.q.Publish(ctx, entity, stamp(body, at, d.id, n))

	t.mu.Lock()
	t.inflight--
	if t.inflight == 0 && !t.closed && (!t.armed || t.sent > 0) {
		// Start the marks' schedule, or restart it if it was waiting for
		// a later mark. A first mark already due is left to find that
		// this publish happened.
		t.marked, t.sent = t.n, 0
		t.arm(d.timing.marks[0])
	}
	t.mu.Unlock()
	// A failed publish leaves its number unused: subscribers see a hole and
	// resync, which suits a notification that may not have gone out.
	return err
}

// arm schedules markDue after delay. With t.mu held.
func (t *seqTopic) arm(delay time.Duration) {
	t.armed = true
	if t.timer == nil {
		t.timer = time.AfterFunc(delay, t.markDue)
	} else {
		t.timer.Reset(delay)
	}
}

// markDue sends the mark that is due and arms the timer for the next one.
// If anything was published since the schedule started, the first mark
// waits for a whole quiet interval instead: while publishes continue, the
// timer only re-arms itself every marks[0], and the first mark goes out
// between marks[0] and twice that after the last publish.
func (t *seqTopic) markDue() {
	marks := t.d.timing.marks
	t.mu.Lock()
	t.armed = false
	if t.closed || t.inflight > 0 {
		// A running publish arms the timer when it returns.
		t.mu.Unlock()
		return
	}
	if t.n != t.marked {
		t.marked, t.sent = t.n, 0
		t.arm(marks[0])
		t.mu.Unlock()
		return
	}
	if t.sent >= len(marks) { // the schedule is done: quiet until a publish
		t.mu.Unlock()
		return
	}
	n := t.n
	t.sent++
	if t.sent < len(marks) {
		t.arm(marks[t.sent] - marks[t.sent-1])
	}
	t.d.running.Add(1)
	t.mu.Unlock()
	defer t.d.running.Done()
	// Every number up to n has been published (or failed), so a subscriber
	// missing one when the mark arrives has lost it.
	_ = t.d.q.Publish(t.d.ctx, t.entity, markBody(t.d.id, n))
}

// Subscribe subscribes on the wrapped queue, checking each stamped message's
// sequence number and consuming marks (see DetectLoss).
func (d *lossDetector) Subscribe(entity shared.EntityType, onMessage func(body []byte), onLoss func()) error {
	now := time.Now()
	s := &seqSub{d: d, entity: entity, onMessage: onMessage, onLoss: onLoss,
		peers: make(map[string]*seqPeer), lastSweep: now, since: now}
	innerLoss := onLoss
	if onLoss != nil {
		innerLoss = func() {
			s.mu.Lock()
			s.coverAll()
			// This resync covers every loss found so far, including one
			// waiting for the end of the rate limit's window.
			s.deferredN = 0
			s.nextResync = time.Now().Add(s.d.timing.resyncEvery)
			s.mu.Unlock()
			onLoss()
		}
	}
	// Registered first, so that a Close running meanwhile stops its timer.
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return ErrClosed
	}
	d.subs = append(d.subs, s)
	d.mu.Unlock()
	if err := d.q.Subscribe(entity, s.handle, innerLoss); err != nil {
		d.mu.Lock()
		for i, x := range d.subs {
			if x == s {
				d.subs = append(d.subs[:i], d.subs[i+1:]...)
				break
			}
		}
		d.mu.Unlock()
		return err
	}
	return nil
}

// seqSub checks one entity type's sequences.
type seqSub struct {
	d         *lossDetector
	entity    shared.EntityType
	onMessage func([]byte)
	onLoss    func()

	// since is when Subscribe was called: a publisher that started later
	// had every message it published reach the subscription.
	since time.Time

	mu    sync.Mutex
	peers map[string]*seqPeer // by publisher id
	// recent and oldest are the ends of the list of peers, by when they
	// were last heard: the oldest is forgotten for a new one beyond
	// maxPublishers.
	recent, oldest *seqPeer
	longIDWarned   bool // a publisher id too long to track was logged
	// nextResync is the earliest time the detector may call onLoss again;
	// deferredN counts the messages of the losses waiting for it (with how
	// the last was found), reported by resyncTimer.
	nextResync  time.Time
	deferredN   uint64
	deferredHow string
	resyncTimer *time.Timer
	resyncArmed bool
	holes       int // open holes, of every publisher (at most maxHoles)
	// untracked is when the oldest hole that was not recorded (beyond
	// maxHoles) opened, zero if none; untrackedN counts their numbers.
	untracked  time.Time
	untrackedN uint64
	epoch      uint64 // advanced by each sweep
	lastSweep  time.Time
	// busy counts the onMessage calls running; busySince is when the
	// count last left 0.
	busy      int
	busySince time.Time
	// resumed is when the subscription last came out of a stall (see
	// DetectLoss): no hole's grace counts from before it.
	resumed time.Time
	timer   *time.Timer // confirms holes that outlive grace
	timerAt time.Time   // when the timer is due, while armed
	armed   bool
	closed  bool
}

// seqPeer is what a subscriber knows of one publisher.
type seqPeer struct {
	id           string
	newer, older *seqPeer // in the subscription's list, by when last heard
	last         uint64   // highest number received
	holes        []span   // numbers below last not received, ascending (and so by opened)
	epoch        uint64   // the sweep epoch it was last heard in
}

// span is the sequence numbers from..to, inclusive, missing since opened.
type span struct {
	from, to uint64
	opened   time.Time
}

func (s *seqSub) handle(body []byte) {
	pub, n, mark, ok := parseStamp(body)
	if ok && len(pub) > maxPublisherID {
		ok = false
		s.mu.Lock()
		warn := !s.longIDWarned
		s.longIDWarned = true
		s.mu.Unlock()
		if warn {
			s.d.log.WithField("entity", s.entity).Warnf("a message stamped by a publisher id of %d bytes (at most %d are tracked): such messages are passed on untracked and such marks dropped; none of this process's publishers makes them", len(pub), maxPublisherID)
		}
	}
	if !mark {
		s.enter()
		defer s.exit()
		s.onMessage(body)
	}
	if !ok {
		return
	}
	if missing := s.check(pub, n, mark); missing > 0 {
		s.lost(missing, "a mark sent after them")
	}
}

// enter and exit bracket an onMessage call: while it runs, the
// subscription cannot take the next message, which may be the one a hole
// waits for.
func (s *seqSub) enter() {
	s.mu.Lock()
	if s.busy == 0 {
		s.busySince = time.Now()
	}
	s.busy++
	s.mu.Unlock()
}

func (s *seqSub) exit() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.busy--; s.busy > 0 {
		return
	}
	if now := time.Now(); now.Sub(s.busySince) > s.d.timing.stall {
		// A stall: the messages that queued up meanwhile get their grace
		// from now (graceDue, which found it stalling, left the holes to
		// the timer it armed).
		s.resumed = now
	}
}

// check records number n from publisher pub and returns how many messages
// are known lost (0: none).
func (s *seqSub) check(pub []byte, n uint64, mark bool) (missing uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || !s.record(pub, n, mark) {
		return 0
	}
	return s.coverAll()
}

// lost reports a loss of missing messages: logged and passed to onLoss now,
// or at the end of the rate limit's window (resyncDue) when onLoss was
// called less than resyncEvery ago. The holes were covered already: the
// resync, whenever it starts, starts after they were found.
func (s *seqSub) lost(missing uint64, how string) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	now := time.Now()
	if wait := s.nextResync.Sub(now); wait > 0 {
		s.deferredN += missing
		s.deferredHow = how
		if !s.resyncArmed {
			s.resyncArmed = true
			if s.resyncTimer == nil {
				s.resyncTimer = time.AfterFunc(wait, s.resyncDue)
			} else {
				s.resyncTimer.Reset(wait)
			}
		}
		s.mu.Unlock()
		return
	}
	s.nextResync = now.Add(s.d.timing.resyncEvery)
	s.mu.Unlock()
	s.report(missing, how)
}

// resyncDue reports the losses that waited for the end of the rate limit's
// window, unless a resync of the wrapped queue covered them meanwhile.
func (s *seqSub) resyncDue() {
	s.mu.Lock()
	s.resyncArmed = false
	if s.closed || s.deferredN == 0 {
		s.mu.Unlock()
		return
	}
	missing, how := s.deferredN, s.deferredHow
	s.deferredN = 0
	s.nextResync = time.Now().Add(s.d.timing.resyncEvery)
	s.d.running.Add(1)
	s.mu.Unlock()
	defer s.d.running.Done()
	s.report(missing, how)
}

// report logs a loss and calls onLoss.
func (s *seqSub) report(missing uint64, how string) {
	s.d.log.WithField("entity", s.entity).Warnf(
		"%d notifications lost by the queue (found by %s): re-fetching the subscribed keys. With NSQ: an nsqd restarted or was unreachable, or this server's channel overflowed (then raise nsqd's --mem-queue-size or find what stalls the server)", missing, how)
	if s.onLoss != nil {
		s.onLoss()
	}
}

// coverAll forgets every open hole, of every publisher, when onLoss is about
// to be called, and returns how many numbers they held. The resync onLoss
// starts covers them all: a hole's missing number was given out before a
// higher one that has arrived, so its change was committed before now, and
// the resync's fetches, which start after now, see it. With s.mu held.
func (s *seqSub) coverAll() (missing uint64) {
	for _, p := range s.peers {
		for _, h := range p.holes {
			missing += h.to - h.from + 1
		}
		p.holes = p.holes[:0]
	}
	missing += s.untrackedN
	s.holes, s.untracked, s.untrackedN = 0, time.Time{}, 0
	return missing
}

// record is check's work. With s.mu held.
func (s *seqSub) record(pub []byte, n uint64, mark bool) (lost bool) {
	p := s.peers[string(pub)]
	fresh := p == nil
	if fresh {
		s.sweep()
		if len(s.peers) >= s.d.timing.maxPublishers {
			s.forget(s.oldest)
		}
		p = &seqPeer{id: string(pub)}
		s.peers[p.id] = p
	}
	p.epoch = s.epoch
	if p != s.recent { // most recently heard: to the front of the list
		if !fresh {
			s.unlink(p)
		}
		p.older = s.recent
		if s.recent != nil {
			s.recent.newer = p
		}
		s.recent = p
		if s.oldest == nil {
			s.oldest = p
		}
	}
	if fresh && !s.startedSince(pub) {
		p.last = n
		return false
	}
	// (For a publisher that started since: numbers from 1 should all have
	// come, so n is checked as if 0 had.)
	if mark {
		// Every number up to n was published before the mark: those still
		// missing are lost (the caller covers every hole at once, so this
		// one may exceed maxHoles).
		if n > p.last {
			p.holes = append(p.holes, span{p.last + 1, n, time.Now()})
			s.holes++
			p.last = n
		}
		return len(p.holes) > 0 && p.holes[0].from <= n
	}
	switch {
	case n == p.last+1:
		p.last = n
	case n > p.last+1:
		now := time.Now()
		if s.holes < s.d.timing.maxHoles {
			p.holes = append(p.holes, span{p.last + 1, n - 1, now})
			s.holes++
		} else {
			// Not recorded: its late numbers cannot fill it, so it is a
			// loss once grace has passed, like a hole nothing filled.
			if s.untracked.IsZero() {
				s.untracked = now
			}
			s.untrackedN += n - 1 - p.last
		}
		p.last = n
		s.armGrace(s.d.timing.grace)
	default:
		s.holes += p.fill(n)
	}
	return false
}

// unlink takes p out of the list of peers. With s.mu held.
func (s *seqSub) unlink(p *seqPeer) {
	if p.newer != nil {
		p.newer.older = p.older
	} else {
		s.recent = p.older
	}
	if p.older != nil {
		p.older.newer = p.newer
	} else {
		s.oldest = p.newer
	}
	p.newer, p.older = nil, nil
}

// forget drops publisher p. Its open holes can no longer be filled: they
// join the untracked ones, a loss once grace has passed since they opened.
// With s.mu held.
func (s *seqSub) forget(p *seqPeer) {
	for _, h := range p.holes {
		if s.untracked.IsZero() || h.opened.Before(s.untracked) {
			s.untracked = h.opened
		}
		s.untrackedN += h.to - h.from + 1
	}
	if len(p.holes) > 0 {
		s.holes -= len(p.holes)
		s.armGrace(0) // graceDue works out when they are due
	}
	s.unlink(p)
	delete(s.peers, p.id)
}

// armGrace makes graceDue run after wait, unless it is due already. With
// s.mu held.
func (s *seqSub) armGrace(wait time.Duration) {
	if s.armed {
		return
	}
	s.armed = true
	s.timerAt = time.Now().Add(wait)
	if s.timer == nil {
		s.timer = time.AfterFunc(wait, s.graceDue)
	} else {
		s.timer.Reset(wait)
	}
}

// startedSince reports whether publisher pub started after the subscription
// and less than the forget period ago: then it cannot have been heard and
// forgotten, so this is the first time it is heard from. With s.mu held.
func (s *seqSub) startedSince(pub []byte) bool {
	start, ok := publisherStart(pub)
	return ok && start.After(s.since) && time.Since(start) < s.d.timing.forget
}

// publisherID is a publisher's id: its start time in Unix milliseconds, in
// hex, a dash, and random hex digits.
func publisherID(start time.Time, random string) string {
	return strconv.FormatInt(start.UnixMilli(), 16) + "-" + random
}

// publisherStart reads the start time from a publisher id; ok is false for
// an id without one (from an older version, or a test).
func publisherStart(pub []byte) (time.Time, bool) {
	dash := bytes.IndexByte(pub, '-')
	if dash < 1 || dash > 16 {
		return time.Time{}, false
	}
	ms, err := strconv.ParseInt(string(pub[:dash]), 16, 64)
	if err != nil || ms <= 0 {
		return time.Time{}, false
	}
	return time.UnixMilli(ms), true
}

// fill records the late arrival of n, and returns by how much the number of
// holes changed: -1 (one closed), 1 (one split in two) or 0.
func (p *seqPeer) fill(n uint64) int {
	for i := range p.holes {
		h := &p.holes[i]
		if n < h.from || n > h.to {
			continue
		}
		switch {
		case h.from == h.to:
			p.holes = append(p.holes[:i], p.holes[i+1:]...)
			return -1
		case n == h.from:
			h.from++
		case n == h.to:
			h.to--
		default:
			rest := span{n + 1, h.to, h.opened}
			h.to = n - 1
			p.holes = append(p.holes, span{})
			copy(p.holes[i+2:], p.holes[i+1:])
			p.holes[i+1] = rest
			return 1
		}
		return 0
	}
	return 0
}

// graceDue reports the holes whose grace has passed as a loss and arms the
// timer for the rest.
func (s *seqSub) graceDue() {
	s.mu.Lock()
	s.armed = false
	if s.closed {
		s.mu.Unlock()
		return
	}
	now := time.Now()
	tm := s.d.timing
	if now.Sub(s.timerAt) > tm.stall {
		// This timer ran late, so the subscription's goroutine may not
		// have run either: its grace starts again.
		s.resumed = now
	}
	stalling := s.busy > 0 && now.Sub(s.busySince) > tm.stall
	lost := false
	var next time.Duration
	due := func(opened time.Time) {
		wait := tm.grace - now.Sub(later(opened, s.resumed))
		if stalling {
			// Not judged while onMessage stalls: looked at again in a
			// grace, by when exit has set resumed.
			wait = max(wait, tm.grace)
		}
		if wait = min(wait, tm.maxGrace-now.Sub(opened)); wait > 0 {
			if next == 0 || wait < next {
				next = wait
			}
		} else {
			lost = true
		}
	}
	if !s.untracked.IsZero() {
		due(s.untracked)
	}
	for _, p := range s.peers {
		if len(p.holes) > 0 {
			due(p.holes[0].opened) // the oldest of the publisher's holes
		}
	}
	if !lost {
		if next > 0 {
			s.armGrace(next)
		}
		s.mu.Unlock()
		return
	}
	missing := s.coverAll()
	s.d.running.Add(1)
	s.mu.Unlock()
	defer s.d.running.Done()
	s.lost(missing, fmt.Sprintf("a gap in the sequence still open after %s of grace", tm.grace))
}

// later returns the later of a and b.
func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// sweep forgets the publishers not heard from since the previous sweep, at
// most once per forget period. It runs when a new publisher appears, the
// only time the map grows. With s.mu held.
func (s *seqSub) sweep() {
	now := time.Now()
	if now.Sub(s.lastSweep) < s.d.timing.forget {
		return
	}
	for _, p := range s.peers {
		if p.epoch != s.epoch && len(p.holes) == 0 {
			s.forget(p)
		}
	}
	s.epoch++
	s.lastSweep = now
}

// Close stops the marks' timers, closes the wrapped queue, then stops the
// subscriptions' timers, and waits for running timer callbacks or ctx.
// Live is the wrapped queue's (see CheckLive).
func (d *lossDetector) Live() error {
	d.mu.RLock()
	closed := d.closed
	d.mu.RUnlock()
	if closed {
		return ErrClosed
	}
	return CheckLive(d.q)
}

func (d *lossDetector) Close(ctx context.Context) error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return d.q.Close(ctx)
	}
	d.closed = true
	topics := make([]*seqTopic, 0, len(d.topics))
	for _, t := range d.topics {
		topics = append(topics, t)
	}
	subs := append([]*seqSub(nil), d.subs...)
	d.mu.Unlock()

	for _, t := range topics {
		t.mu.Lock()
		t.closed = true
		if t.timer != nil {
			t.timer.Stop()
		}
		t.mu.Unlock()
	}
	d.cancel()
	err := d.q.Close(ctx)
	// The wrapped queue delivers nothing more, so no timer is armed again.
	for _, s := range subs {
		s.mu.Lock()
		s.closed = true
		if s.timer != nil {
			s.timer.Stop()
		}
		if s.resyncTimer != nil {
			s.resyncTimer.Stop()
		}
		s.mu.Unlock()
	}
	done := make(chan struct{})
	go func() { d.running.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		if err == nil {
			err = ctx.Err()
		}
	}
	return err
}

// The stamp is the last field of the object: `,"_es":{"p":"<id>","n":<n>}}`.
// A mark is the stamp alone: `{"_es":{"p":"<id>","n":<n>}}`.
var (
	stampKey = []byte(`"_es":{"p":"`)
	stampN   = []byte(`","n":`)
)

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// stampAt returns the index of the closing brace of body, a non-empty JSON
// object, or false if body is anything else. Only the braces are checked:
// the stamp is appended inside them.
func stampAt(body []byte) (int, bool) {
	start, end := 0, len(body)
	for start < end && isSpace(body[start]) {
		start++
	}
	for end > start && isSpace(body[end-1]) {
		end--
	}
	if end-start < 2 || body[start] != '{' || body[end-1] != '}' {
		return 0, false
	}
	i := end - 2
	for i > start && isSpace(body[i]) {
		i--
	}
	if i == start { // {}: stamped, it would read as a mark
		return 0, false
	}
	return end - 1, true
}

// stamp returns a copy of body with the stamp inserted at its closing brace.
func stamp(body []byte, at int, id string, n uint64) []byte {
	out := make([]byte, 0, at+1+len(stampKey)+len(id)+len(stampN)+20+2)
	out = append(out, body[:at]...)
	out = append(out, ',')
	return appendStamp(out, id, n)
}

func markBody(id string, n uint64) []byte {
	out := make([]byte, 0, 1+len(stampKey)+len(id)+len(stampN)+20+2)
	out = append(out, '{')
	return appendStamp(out, id, n)
}

func appendStamp(out []byte, id string, n uint64) []byte {
	out = append(out, stampKey...)
	out = append(out, id...)
	out = append(out, stampN...)
	out = strconv.AppendUint(out, n, 10)
	return append(out, '}', '}')
}

// parseStamp finds the stamp at the end of body, reading backwards from the
// last byte. ok is false for a body without a well-formed stamp (passed on
// untracked); mark is true for a mark.
func parseStamp(body []byte) (pub []byte, n uint64, mark, ok bool) {
	l := len(body)
	if l < len(stampKey)+len(stampN)+5 || body[l-1] != '}' || body[l-2] != '}' {
		return nil, 0, false, false
	}
	// The number.
	d := l - 2
	for d > 0 && body[d-1] >= '0' && body[d-1] <= '9' {
		d--
	}
	digits := body[d : l-2]
	if len(digits) == 0 || len(digits) > 19 {
		return nil, 0, false, false
	}
	for _, c := range digits {
		n = n*10 + uint64(c-'0')
	}
	if n == 0 || !bytes.HasSuffix(body[:d], stampN) {
		return nil, 0, false, false
	}
	// The publisher id, up to the quote that ends stampKey.
	end := d - len(stampN)
	q := bytes.LastIndexByte(body[:end], '"')
	if q < 0 || q == end-1 || !bytes.HasSuffix(body[:q+1], stampKey) {
		return nil, 0, false, false
	}
	pub = body[q+1 : end]
	i := q + 1 - len(stampKey)
	switch {
	case i == 0:
		return nil, 0, false, false
	case body[i-1] == ',':
	case body[i-1] == '{' && i == 1:
		mark = true
	default:
		return nil, 0, false, false
	}
	return pub, n, mark, true
}
