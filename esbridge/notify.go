package esbridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

// ErrNotifyBacklog is returned by NotifyAsync when MaxPendingNotifications
// keys already wait to be published (the broker is slow or down): the
// notification was not queued, and the caller decides what to do (retry,
// fall back to NotifyAllOfChange, fail its request).
var ErrNotifyBacklog = errors.New("esbridge: too many notifications waiting to be published")

// NotifyAllOfChange tells every server that the entity behind key changed.
// Call it after the change is committed. It returns once the queue has
// accepted the notification (for NSQ, nsqd's acknowledgement), or with the
// error that prevented it. With the in-process queue, this server's round
// for a key with few subscribers (at most 50) starts at once on the
// caller's core, and the call may return only after it (a fetch and a
// fan-out, typically a fraction of a millisecond): the subscribers see the
// change sooner, the caller's response goes a little later.
func (b *Bridge) NotifyAllOfChange(key shared.EntityKey) error {
	if err := key.Validate(); err != nil {
		return err
	}
	if b.isClosed() {
		return ErrClosed
	}
	return b.publishKey(context.Background(), key)
}

// NotifyKeys tells every server that the entities behind keys changed: a
// write that touches a row and the lists it belongs to notifies all their
// keys in one call. It sends one queue message per entity type,
// {"entity":"lists","ids":["1","2"]} ({"entity":"lists","id":"1"}, the form
// every version of entity-sync reads, for a type with one key), split into
// several when the queue limits a message's size (esq.SizeLimited, as
// Postgres does). A key named twice is sent once. It returns once the queue
// has accepted every message, or with the first error: the messages before
// it stay published, and calling again is harmless.
func (b *Bridge) NotifyKeys(ctx context.Context, keys ...shared.EntityKey) error {
	for _, key := range keys {
		if err := key.Validate(); err != nil {
			return fmt.Errorf("%w: %s", err, key)
		}
	}
	if b.isClosed() {
		return ErrClosed
	}
	return b.publish(ctx, keys)
}

func (b *Bridge) isClosed() bool {
	b.life.RLock()
	defer b.life.RUnlock()
	return b.closed
}

// publish sends keys' notifications (see NotifyKeys).
func (b *Bridge) publish(ctx context.Context, keys []shared.EntityKey) error {
	if len(keys) == 1 {
		return b.publishKey(ctx, keys[0])
	}
	msgs, err := notifications(keys, esq.MaxMessageBytes(b.queue))
	if err != nil {
		return err
	}
	for _, m := range msgs {
		if err := b.send(ctx, m); err != nil {
			return err
		}
	}
	return nil
}

// publishKey sends one key's notification in the seed's form, without the
// grouping's allocations: the common case. A queue that takes keys as they
// are (esq.KeyQueue) encodes it itself, or not at all.
func (b *Bridge) publishKey(ctx context.Context, key shared.EntityKey) error {
	if b.keys != nil {
		if err := b.keys.PublishKey(ctx, key); err != nil {
			return fmt.Errorf("esbridge: notify %s: %w", key, err)
		}
		b.stats.notifications.Add(1)
		return nil
	}
	return b.send(ctx, message{entity: key.Entity, body: esq.KeyBody(key), keys: 1, first: key.ID})
}

// send publishes one message.
func (b *Bridge) send(ctx context.Context, m message) error {
	if err := b.queue.Publish(ctx, m.entity, m.body); err != nil {
		if m.keys == 1 {
			return fmt.Errorf("esbridge: notify %s: %w", shared.EntityKey{Entity: m.entity, ID: m.first}, err)
		}
		return fmt.Errorf("esbridge: notify %d keys of %q: %w", m.keys, m.entity, err)
	}
	b.stats.notifications.Add(uint64(m.keys))
	return nil
}

// message is one queue message of a notification.
type message struct {
	entity shared.EntityType
	body   []byte
	keys   int    // how many keys it names
	first  string // the id of the first
}

// notifications encodes keys as queue messages: one per entity type, in
// the order the types first appear, each id once, split so that no
// message exceeds limit bytes (0: no limit). A single key too large for
// the limit still gets its message: the queue's refusal says why.
func notifications(keys []shared.EntityKey, limit int) ([]message, error) {
	if len(keys) == 1 { // the common case: the seed's form, no grouping
		return []message{{entity: keys[0].Entity, body: esq.KeyBody(keys[0]), keys: 1, first: keys[0].ID}}, nil
	}
	var types []shared.EntityType
	ids := make(map[shared.EntityType][]string)
	seen := make(map[shared.EntityKey]struct{}, len(keys))
	for _, k := range keys {
		if _, dup := seen[k]; dup {
			continue
		}
		seen[k] = struct{}{}
		if _, ok := ids[k.Entity]; !ok {
			types = append(types, k.Entity)
		}
		ids[k.Entity] = append(ids[k.Entity], k.ID)
	}
	var msgs []message
	for _, entity := range types {
		var chunk []string
		size := 0 // of the message holding chunk
		for _, id := range ids[entity] {
			q, err := json.Marshal(id)
			if err != nil {
				return nil, fmt.Errorf("esbridge: encode key: %w", err)
			}
			if len(chunk) > 0 && limit > 0 && size+1+len(q) > limit {
				m, err := encodeNotification(entity, chunk)
				if err != nil {
					return nil, err
				}
				msgs = append(msgs, m)
				chunk = chunk[:0]
			}
			if len(chunk) == 0 {
				size = len(`{"entity":,"ids":[]}`) + len(mustQuote(string(entity)))
			} else {
				size++ // the comma
			}
			chunk = append(chunk, id)
			size += len(q)
		}
		m, err := encodeNotification(entity, chunk)
		if err != nil {
			return nil, err
		}
		msgs = append(msgs, m)
	}
	return msgs, nil
}

func mustQuote(s string) []byte {
	b, _ := json.Marshal(s) // a string always encodes
	return b
}

// encodeNotification encodes one message for ids of entity: the seed's
// single-key form for one id.
func encodeNotification(entity shared.EntityType, ids []string) (message, error) {
	n := shared.Notification{Entity: entity}
	if len(ids) == 1 {
		n.ID = ids[0]
	} else {
		n.IDs = ids
	}
	body, err := json.Marshal(n)
	if err != nil {
		return message{}, fmt.Errorf("esbridge: encode keys: %w", err)
	}
	return message{entity: entity, body: body, keys: len(ids), first: ids[0]}, nil
}

// NotifyAsync is NotifyAllOfChange for hot write paths: it queues the
// notification and returns at once, and a background publisher hands the
// queued keys to the queue one after the other. A key already waiting is
// not queued twice (a notification carries only the key, so one covers
// both). A publish that fails is retried with the fetch retry backoff
// (RetryDelay up to MaxRetryDelay) until it succeeds or the bridge closes,
// and each failure is passed to Options.OnNotifyError: nothing is dropped
// silently. At most MaxPendingNotifications keys wait; past that,
// NotifyAsync returns ErrNotifyBacklog. Close publishes what is waiting,
// within its context, and says how many it could not.
func (b *Bridge) NotifyAsync(key shared.EntityKey) error {
	return b.NotifyKeysAsync(key)
}

// NotifyKeysAsync is NotifyKeys the NotifyAsync way: the keys are queued
// together (those not already waiting) and published together, one message
// per entity type, by the background publisher. Either every key is
// queued or, with ErrNotifyBacklog or an invalid key, none is.
func (b *Bridge) NotifyKeysAsync(keys ...shared.EntityKey) error {
	for _, key := range keys {
		if err := key.Validate(); err != nil {
			return fmt.Errorf("%w: %s", err, key)
		}
	}
	n := &b.notifier
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return ErrClosed
	}
	var batch []shared.EntityKey
	for _, key := range keys {
		if _, ok := n.waiting[key]; ok || slices.Contains(batch, key) {
			continue
		}
		batch = append(batch, key)
	}
	if len(batch) == 0 {
		return nil
	}
	if n.pending+len(batch) > b.opts.MaxPendingNotifications {
		return ErrNotifyBacklog
	}
	if n.waiting == nil {
		n.waiting = make(map[shared.EntityKey]*notifyBatch)
	}
	n.seq++
	nb := &notifyBatch{keys: batch, seq: n.seq}
	for _, key := range batch {
		n.waiting[key] = nb
	}
	n.fifo = append(n.fifo, nb)
	n.pending += len(batch)
	if !n.running {
		n.running = true
		n.done = make(chan struct{})
		go b.publishQueued(n.done)
	}
	return nil
}

// FlushNotifications waits until every notification NotifyAsync queued
// before the call has been published, or ctx ends. A key whose publish
// failed counts only once a later publish of it succeeded.
func (b *Bridge) FlushNotifications(ctx context.Context) error {
	n := &b.notifier
	n.mu.Lock()
	target := n.seq
	for n.oldest() <= target {
		progress := n.progress
		if progress == nil {
			progress = make(chan struct{})
			n.progress = progress
		}
		n.mu.Unlock()
		select {
		case <-progress:
		case <-ctx.Done():
			return fmt.Errorf("esbridge: notifications still waiting: %w", ctx.Err())
		}
		n.mu.Lock()
	}
	n.mu.Unlock()
	return nil
}

// oldest returns the seq of the oldest batch not yet published (the fifo
// is in order of seq, and the batch in flight came before it), or the
// largest uint64 when none waits. With n.mu held.
func (n *notifier) oldest() uint64 {
	switch {
	case n.inFlight != nil:
		return n.inFlight.seq
	case len(n.fifo) > 0:
		return n.fifo[0].seq
	}
	return math.MaxUint64
}

// publishQueued is the background publisher: it runs while keys wait.
func (b *Bridge) publishQueued(done chan struct{}) {
	defer close(done)
	n := &b.notifier
	var retry time.Duration
	for {
		n.mu.Lock()
		if len(n.fifo) == 0 || n.stopped {
			n.running = false
			n.mu.Unlock()
			return
		}
		// The keys leave the waiting set as their publish starts: a change
		// written meanwhile may be too late for this message's fetches, so
		// NotifyAsync must queue the key again rather than count on it.
		// They count as pending (MaxPendingNotifications) until published.
		nb := n.fifo[0]
		n.fifo[0] = nil
		n.fifo = n.fifo[1:]
		if len(nb.keys) == 0 { // its keys went to an older, failed batch
			n.batchDone()
			n.mu.Unlock()
			continue
		}
		for _, key := range nb.keys {
			delete(n.waiting, key)
		}
		n.inFlight = nb
		n.mu.Unlock()

		err := b.publish(b.ctx, nb.keys)

		n.mu.Lock()
		n.inFlight = nil
		if err == nil {
			retry = 0
			n.pending -= len(nb.keys)
			n.batchDone()
			n.mu.Unlock()
			continue
		}
		// The batch goes back to the front, its seq unchanged, so a flush
		// that waits for it goes on waiting. A key queued again meanwhile
		// leaves its later batch: this retry starts after that queueing,
		// so it covers it. (Some keys may have been published by a message
		// before the failed one: publishing them again is harmless.)
		// One pass over each later batch, not one per key taken back.
		var taken map[*notifyBatch]map[shared.EntityKey]bool
		for _, key := range nb.keys {
			if later := n.waiting[key]; later != nil {
				if taken[later] == nil {
					if taken == nil {
						taken = make(map[*notifyBatch]map[shared.EntityKey]bool)
					}
					taken[later] = make(map[shared.EntityKey]bool)
				}
				taken[later][key] = true
				n.pending--
			}
			n.waiting[key] = nb
		}
		for later, keys := range taken {
			later.keys = slices.DeleteFunc(later.keys, func(k shared.EntityKey) bool { return keys[k] })
		}
		n.fifo = slices.Insert(n.fifo, 0, nb)
		n.mu.Unlock()
		b.stats.notifyErrors.Add(1)
		if b.opts.OnNotifyError != nil {
			b.opts.OnNotifyError(nb.keys[0], err)
		} else {
			b.log.WithError(err).WithField("key", nb.keys[0].String()).Warn("queued notification not published; retrying")
		}
		if retry == 0 {
			retry = b.opts.RetryDelay
		} else if retry *= 2; retry > b.opts.MaxRetryDelay {
			retry = b.opts.MaxRetryDelay
		}
		t := time.NewTimer(retry)
		select {
		case <-t.C:
		case <-b.ctx.Done():
			t.Stop()
		}
	}
}

// batchDone wakes the flushes waiting for a batch. With n.mu held.
func (n *notifier) batchDone() {
	if n.progress != nil {
		close(n.progress)
		n.progress = nil
	}
}

// closeNotifier stops taking notifications and publishes what waits, until
// ctx ends. It returns an error saying how many were not published.
func (b *Bridge) closeNotifier(ctx context.Context) error {
	n := &b.notifier
	n.mu.Lock()
	n.closed = true
	done := n.done
	running := n.running
	n.mu.Unlock()
	if !running {
		return nil
	}
	select {
	case <-done:
	case <-ctx.Done():
		n.mu.Lock()
		n.stopped = true
		n.mu.Unlock()
	}
	n.mu.Lock()
	left := n.pending
	n.mu.Unlock()
	if left > 0 {
		return fmt.Errorf("esbridge: %d queued notifications not published before close", left)
	}
	return nil
}
