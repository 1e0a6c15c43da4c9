package esbridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

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
// error that prevented it.
func (b *Bridge) NotifyAllOfChange(key shared.EntityKey) error {
	if err := key.Validate(); err != nil {
		return err
	}
	if b.isClosed() {
		return ErrClosed
	}
	return b.publish(context.Background(), key)
}

func (b *Bridge) isClosed() bool {
	b.life.RLock()
	defer b.life.RUnlock()
	return b.closed
}

func (b *Bridge) publish(ctx context.Context, key shared.EntityKey) error {
	body, err := json.Marshal(key)
	if err != nil {
		return fmt.Errorf("esbridge: encode key: %w", err)
	}
	if err := b.queue.Publish(ctx, key.Entity, body); err != nil {
		return fmt.Errorf("esbridge: notify %s: %w", key, err)
	}
	b.stats.notifications.Add(1)
	return nil
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
	if err := key.Validate(); err != nil {
		return err
	}
	n := &b.notifier
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return ErrClosed
	}
	if _, ok := n.waiting[key]; ok {
		return nil
	}
	if len(n.fifo) >= b.opts.MaxPendingNotifications {
		return ErrNotifyBacklog
	}
	if n.waiting == nil {
		n.waiting = make(map[shared.EntityKey]struct{})
	}
	n.waiting[key] = struct{}{}
	n.fifo = append(n.fifo, key)
	n.queued++
	if !n.running {
		n.running = true
		n.done = make(chan struct{})
		go b.publishQueued(n.done)
	}
	return nil
}

// FlushNotifications waits until every notification NotifyAsync queued
// before the call has been published, or ctx ends.
func (b *Bridge) FlushNotifications(ctx context.Context) error {
	n := &b.notifier
	n.mu.Lock()
	target := n.queued
	for n.published < target {
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
		// The key leaves the waiting set as its publish starts: a change
		// written meanwhile may be too late for this message's fetches, so
		// NotifyAsync must queue the key again rather than count on it.
		key := n.fifo[0]
		n.fifo[0] = shared.EntityKey{}
		n.fifo = n.fifo[1:]
		delete(n.waiting, key)
		n.mu.Unlock()

		err := b.publish(b.ctx, key)

		n.mu.Lock()
		if err == nil {
			retry = 0
			n.done1()
			n.mu.Unlock()
			continue
		}
		if _, again := n.waiting[key]; again {
			n.done1() // queued again meanwhile: that entry covers this one
		} else {
			n.fifo = append([]shared.EntityKey{key}, n.fifo...)
			n.waiting[key] = struct{}{}
		}
		n.mu.Unlock()
		b.stats.notifyErrors.Add(1)
		if b.opts.OnNotifyError != nil {
			b.opts.OnNotifyError(key, err)
		} else {
			b.log.WithError(err).WithField("key", key.String()).Warn("queued notification not published; retrying")
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

// done1 counts one queued notification as done. With n.mu held.
func (n *notifier) done1() {
	n.published++
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
	left := len(n.fifo)
	n.mu.Unlock()
	if left > 0 {
		return fmt.Errorf("esbridge: %d queued notifications not published before close", left)
	}
	return nil
}
