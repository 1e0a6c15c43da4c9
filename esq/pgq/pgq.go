// Package pgq is an esq.Queue over PostgreSQL's LISTEN/NOTIFY: the database
// most applications already run carries entity-sync's change notifications
// between servers, with nothing else to operate.
//
// Every server opens one dedicated connection that LISTENs on one channel
// (Config.Channel, "entity_sync" by default) for all entity types; the
// payload is the entity key as JSON, the same as on every queue, and the
// queue hands it to the subscriber of the entity type it names:
//
//	{"entity":"items","id":"100"}
//
// So any SQL makes every server push an entity to its subscribers:
//
//	SELECT pg_notify('entity_sync', '{"entity":"items","id":"100"}');
//
// The payload must name the entity type: a payload with only an id cannot
// be dispatched (one channel carries every type) and is dropped with a
// warning.
//
// Beyond the queue, Notify (and NotifySQL for database/sql) sends the
// notification inside the application's own transaction, so it goes out at
// commit and never on rollback, and TriggerSQL/ApplyTrigger install a trigger
// that notifies every row written to a table, by any program.
//
// Postgres delivers a notification to the sessions listening when the
// sending transaction commits, and to nobody else: a server whose listening
// connection is down misses what was sent meanwhile. The queue reconnects
// with backoff and then calls each subscription's onLoss, which makes the
// bridge re-fetch its keys.
//
// pgx (v5) is imported by this package only; the rest of entity-sync does
// not depend on it.
package pgq

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/shared"
)

// DefaultChannel is the channel used when Config.Channel (or the channel
// given to Notify and Trigger) is empty.
const DefaultChannel = "entity_sync"

// maxChannel is the longest channel name Postgres takes (NAMEDATALEN-1).
const maxChannel = 63

// Config configures a Queue. Zero values take the defaults documented on
// each field.
type Config struct {
	// ConnString is the Postgres connection string, as a URL
	// ("postgres://user@127.0.0.1:5432/app") or keyword/value
	// ("host=127.0.0.1 dbname=app"); pgxpool's pool_* settings
	// (pool_max_conns...) apply to the publishing pool. Required unless Pool
	// is set.
	ConnString string
	// Pool, if set, is the pool Publish sends through (the application's own,
	// typically); without ConnString, the listening connection takes its
	// settings from the pool's. Close leaves it open.
	Pool *pgxpool.Pool
	// Channel is the Postgres notification channel, shared by every entity
	// type and every server of the application. Default "entity_sync". At
	// most 63 bytes; it is case-sensitive (LISTEN quotes it).
	Channel string
	// Logger receives the queue's log lines. Default: logrus's standard
	// logger.
	Logger logrus.FieldLogger
	// MinReconnectDelay is the wait before the second attempt to reconnect the
	// listening connection once it is lost (the first is immediate); each
	// failed attempt doubles it, up to MaxReconnectDelay. Default 100ms.
	MinReconnectDelay time.Duration
	// MaxReconnectDelay caps the wait between reconnect attempts. Default 5s.
	MaxReconnectDelay time.Duration
	// HealthCheckInterval is how long the listening connection may stay
	// silent before the queue checks it with a round trip, to find a
	// connection that died without being closed (a network cut). Default
	// 15s.
	HealthCheckInterval time.Duration
	// Timeout bounds each connect, LISTEN and health check round trip of the
	// listening connection, and how long Subscribe waits for it to be
	// listening when it is being reconnected. Default 10s.
	Timeout time.Duration
}

func (c *Config) setDefaults() error {
	if c.ConnString == "" && c.Pool == nil {
		return errors.New("pgq: Config needs ConnString or Pool")
	}
	if c.Channel == "" {
		c.Channel = DefaultChannel
	}
	if err := checkChannel(c.Channel); err != nil {
		return err
	}
	if c.Logger == nil {
		c.Logger = logrus.StandardLogger()
	}
	if c.MinReconnectDelay == 0 {
		c.MinReconnectDelay = 100 * time.Millisecond
	}
	if c.MaxReconnectDelay == 0 {
		c.MaxReconnectDelay = 5 * time.Second
	}
	if c.HealthCheckInterval == 0 {
		c.HealthCheckInterval = 15 * time.Second
	}
	if c.Timeout == 0 {
		c.Timeout = 10 * time.Second
	}
	if c.MinReconnectDelay < 0 || c.MaxReconnectDelay < c.MinReconnectDelay || c.HealthCheckInterval < 0 || c.Timeout < 0 {
		return errors.New("pgq: Config durations must be positive, and MaxReconnectDelay at least MinReconnectDelay")
	}
	return nil
}

// checkChannel refuses a channel name Postgres would refuse or truncate.
func checkChannel(ch string) error {
	if ch == "" || len(ch) > maxChannel {
		return fmt.Errorf("pgq: channel %q must be 1 to %d bytes", ch, maxChannel)
	}
	for i := 0; i < len(ch); i++ {
		if ch[i] == 0 {
			return fmt.Errorf("pgq: channel %q holds a NUL byte", ch)
		}
	}
	return nil
}

// Queue is an esq.Queue over LISTEN/NOTIFY on one channel. It publishes
// through a connection pool and receives on one dedicated connection, which
// it reconnects when it is lost. Its methods are safe for concurrent use.
type Queue struct {
	cfg       Config
	log       logrus.FieldLogger
	pool      *pgxpool.Pool
	ownPool   bool
	connCfg   *pgx.ConnConfig
	listenSQL string

	ctx    context.Context // cancelled by Close: stops the listener
	cancel context.CancelFunc
	done   chan struct{} // closed when the listener has returned

	mu     sync.RWMutex
	subs   map[shared.EntityType]*subscription
	closed bool
	// live is closed while the listening connection is LISTENing; a new
	// one replaces it when the connection is lost.
	live chan struct{}
	// pid is the listening connection's backend process id (0 while it
	// is being reconnected).
	pid uint32
}

type subscription struct {
	onMessage func([]byte)
	onLoss    func()
}

var _ esq.Queue = (*Queue)(nil)

// New connects the listening connection, LISTENs on the channel and returns
// the queue, or an error if Postgres cannot be reached or refuses (ctx bounds
// the attempt). The publishing pool connects lazily.
func New(ctx context.Context, cfg Config) (*Queue, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	q := &Queue{
		cfg:       cfg,
		log:       cfg.Logger.WithField("component", "esq.pgq").WithField("channel", cfg.Channel),
		pool:      cfg.Pool,
		listenSQL: "LISTEN " + pgx.Identifier{cfg.Channel}.Sanitize(),
		subs:      make(map[shared.EntityType]*subscription),
		live:      make(chan struct{}),
		done:      make(chan struct{}),
	}
	if cfg.ConnString != "" {
		pc, err := pgxpool.ParseConfig(cfg.ConnString)
		if err != nil {
			return nil, fmt.Errorf("pgq: connection string: %w", err)
		}
		q.connCfg = pc.ConnConfig.Copy()
		if q.pool == nil {
			if q.pool, err = pgxpool.NewWithConfig(context.Background(), pc); err != nil {
				return nil, fmt.Errorf("pgq: pool: %w", err)
			}
			q.ownPool = true
		}
	} else {
		q.connCfg = cfg.Pool.Config().ConnConfig.Copy()
	}
	conn, err := q.connect(ctx)
	if err != nil {
		if q.ownPool {
			q.pool.Close()
		}
		return nil, err
	}
	q.setLive(conn)
	q.ctx, q.cancel = context.WithCancel(context.Background())
	go q.run(conn)
	return q, nil
}

// Channel returns the Postgres channel the queue listens and publishes on,
// for Notify and Trigger.
func (q *Queue) Channel() string { return q.cfg.Channel }

// connect opens a listening connection and LISTENs on it.
func (q *Queue) connect(ctx context.Context) (*pgx.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, q.cfg.Timeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, q.connCfg)
	if err != nil {
		return nil, fmt.Errorf("pgq: connect the listening connection: %w", err)
	}
	if _, err := conn.Exec(ctx, q.listenSQL); err != nil {
		closeConn(conn)
		return nil, fmt.Errorf("pgq: %s: %w", q.listenSQL, err)
	}
	return conn, nil
}

func closeConn(conn *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = conn.Close(ctx)
}

// setLive records that conn is LISTENing (nil: it is lost).
func (q *Queue) setLive(conn *pgx.Conn) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if conn != nil {
		q.pid = conn.PgConn().PID()
		close(q.live)
		return
	}
	q.pid = 0
	q.live = make(chan struct{})
}

// ListenerPID returns the backend process id of the listening connection
// (pg_stat_activity.pid), or 0 while it is being reconnected.
func (q *Queue) ListenerPID() uint32 {
	q.mu.RLock()
	defer q.mu.RUnlock()
	return q.pid
}

// run receives notifications on conn until it is lost, reconnects, calls the
// loss callbacks and receives again, until Close.
func (q *Queue) run(conn *pgx.Conn) {
	defer close(q.done)
	for {
		err := q.receive(conn)
		closeConn(conn)
		if q.ctx.Err() != nil {
			return
		}
		q.setLive(nil)
		q.log.WithError(err).Warn("lost the listening connection: reconnecting; notifications sent meanwhile are lost, the subscribed keys will be re-fetched")
		start := time.Now()
		if conn = q.reconnect(); conn == nil {
			return
		}
		q.setLive(conn)
		q.log.Infof("listening again after %s: re-fetching the subscribed keys", time.Since(start).Round(time.Millisecond))
		q.lost()
	}
}

// receive dispatches conn's notifications until conn fails or Close.
func (q *Queue) receive(conn *pgx.Conn) error {
	for {
		ctx, cancel := context.WithTimeout(q.ctx, q.cfg.HealthCheckInterval)
		n, err := conn.WaitForNotification(ctx)
		cancel()
		switch {
		case err == nil:
			if n != nil {
				q.dispatch(n.Payload)
			}
		case q.ctx.Err() != nil:
			return err
		case pgconn.Timeout(err) && !conn.IsClosed():
			// Silent for a while: a round trip tells a dead connection from
			// a quiet one. Repeating LISTEN is harmless, and keeps the
			// statement pg_stat_activity shows for the connection.
			ctx, cancel := context.WithTimeout(q.ctx, q.cfg.Timeout)
			_, err = conn.Exec(ctx, q.listenSQL)
			cancel()
			if err != nil {
				return fmt.Errorf("health check: %w", err)
			}
		default:
			return err
		}
	}
}

// reconnect tries to connect and LISTEN until it succeeds (first at once,
// then with a doubling, jittered delay) or Close; nil after Close.
func (q *Queue) reconnect() *pgx.Conn {
	delay := q.cfg.MinReconnectDelay
	for attempt := 1; ; attempt++ {
		conn, err := q.connect(q.ctx)
		if err == nil {
			return conn
		}
		if q.ctx.Err() != nil {
			return nil
		}
		wait := delay/2 + rand.N(delay/2+1) // jitter: half to all of delay
		entry := q.log.WithError(err).WithField("attempt", attempt)
		if attempt == 1 {
			entry.Warnf("reconnect failed, retrying in %s", wait.Round(time.Millisecond))
		} else {
			entry.Debugf("reconnect failed, retrying in %s", wait.Round(time.Millisecond))
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-q.ctx.Done():
			t.Stop()
			return nil
		}
		delay = min(2*delay, q.cfg.MaxReconnectDelay)
	}
}

// dispatch hands a payload to the subscriber of the entity type it names.
func (q *Queue) dispatch(payload string) {
	entity, body, _, ok := decode([]byte(payload))
	if !ok {
		q.log.WithField("payload", truncate(payload, 200)).Warn(`dropped a notification that names no entity type: send the key as JSON, {"entity":"items","id":"100"}`)
		return
	}
	q.mu.RLock()
	s := q.subs[entity]
	closed := q.closed
	q.mu.RUnlock()
	if s != nil && !closed {
		s.onMessage(body)
	}
}

// lost calls every subscription's onLoss.
func (q *Queue) lost() {
	q.mu.RLock()
	var calls []func()
	for _, s := range q.subs {
		if s.onLoss != nil {
			calls = append(calls, s.onLoss)
		}
	}
	closed := q.closed
	q.mu.RUnlock()
	if closed {
		return
	}
	for _, f := range calls {
		f()
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// MaxMessageBytes is MaxPayload: the bridge splits a notification of many
// keys (esbridge.Bridge.NotifyKeys) into payloads Postgres accepts. (A
// body that is not a JSON object naming its entity type travels base64
// encoded and may exceed it; the bridge never sends one.)
func (q *Queue) MaxMessageBytes() int { return MaxPayload }

// Publish sends body for the entity type on the channel, with pg_notify
// through the pool, and returns once Postgres has accepted it (its
// transaction committed): every server LISTENing then receives it. It
// returns an error when the notification was not sent: ErrPayloadTooLarge
// (checked before sending) when the payload would exceed MaxPayload, or the
// database's error. A body that is the entity's key as JSON is sent as it
// is; any other body is wrapped in a small envelope that receivers unwrap.
func (q *Queue) Publish(ctx context.Context, entity shared.EntityType, body []byte) error {
	payload, err := encode(entity, body)
	if err != nil {
		return err
	}
	q.mu.RLock()
	closed := q.closed
	q.mu.RUnlock()
	if closed {
		return esq.ErrClosed
	}
	_, err = q.pool.Exec(ctx, notifySQL, q.cfg.Channel, payload)
	if err != nil && pgconn.SafeToRetry(err) && ctx.Err() == nil {
		// Nothing reached the server (a pooled connection found dead,
		// typically after a Postgres restart): once more, on another.
		_, err = q.pool.Exec(ctx, notifySQL, q.cfg.Channel, payload)
	}
	if err != nil {
		q.mu.RLock()
		closed := q.closed
		q.mu.RUnlock()
		if closed {
			return esq.ErrClosed
		}
		return fmt.Errorf("pgq: notify %s on channel %q: %w", entity, q.cfg.Channel, err)
	}
	return nil
}

// Subscribe registers the entity type's callbacks and returns once the
// listening connection is LISTENing (at once, unless it is being
// reconnected: then it waits up to Config.Timeout). Callbacks run one at a
// time on the listening goroutine, so they must not block. onLoss, if not
// nil, is called after the listening connection was lost and is LISTENing
// again.
func (q *Queue) Subscribe(entity shared.EntityType, onMessage func(body []byte), onLoss func()) error {
	if onMessage == nil {
		return errors.New("pgq: Subscribe needs onMessage")
	}
	if err := checkEntity(entity); err != nil {
		return err
	}
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return esq.ErrClosed
	}
	if _, ok := q.subs[entity]; ok {
		q.mu.Unlock()
		return esq.ErrAlreadySubscribed
	}
	s := &subscription{onMessage: onMessage, onLoss: onLoss}
	q.subs[entity] = s
	live := q.live
	q.mu.Unlock()

	t := time.NewTimer(q.cfg.Timeout)
	defer t.Stop()
	var err error
	select {
	case <-live:
		return nil
	case <-q.ctx.Done():
		err = esq.ErrClosed
	case <-t.C:
		err = fmt.Errorf("pgq: subscribe %s: the listening connection is not back after %s", entity, q.cfg.Timeout)
	}
	q.mu.Lock()
	if q.subs[entity] == s {
		delete(q.subs, entity)
	}
	q.mu.Unlock()
	return err
}

// Close stops the listener, closes its connection and the pool it made (not
// a Config.Pool), and waits for a running callback and in-flight publishes
// to return, or ctx to end. Publish and Subscribe then return esq.ErrClosed.
func (q *Queue) Close(ctx context.Context) error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil
	}
	q.closed = true
	q.mu.Unlock()
	q.cancel()
	done := make(chan struct{})
	go func() {
		<-q.done
		if q.ownPool {
			q.pool.Close() // waits for in-flight publishes
		}
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
