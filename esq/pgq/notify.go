package pgq

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/entity-sync/entity-sync/shared"
)

// notifySQL sends one notification; $1 is the channel, $2 the payload.
const notifySQL = "SELECT pg_notify($1, $2)"

// Execer runs a statement with arguments the pgx way. pgx.Tx, *pgx.Conn,
// *pgxpool.Pool, *pgxpool.Conn and *pgxpool.Tx have this method.
type Execer interface {
	Exec(ctx context.Context, sql string, arguments ...any) (pgconn.CommandTag, error)
}

// SQLExecer runs a statement with arguments the database/sql way: *sql.Tx,
// *sql.DB and *sql.Conn have this method. The driver must take $1-style
// placeholders, as pgx's stdlib driver and lib/pq do.
type SQLExecer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// Notify sends key on channel ("" for DefaultChannel; a Queue's is
// q.Channel()) through db, with SELECT pg_notify($1, $2). Given the
// application's transaction, the notification is part of it: Postgres
// delivers it to every listening server when the transaction commits, after
// the writes are visible, and never if it rolls back, so a change cannot be
// committed without its notification nor notified without its change. Given
// a pool or a connection outside a transaction, it goes out at once.
//
// Postgres folds identical notifications (same channel and payload) sent in
// one transaction into one: notifying a key several times in a transaction
// pushes it once, which is all entity-sync needs.
//
// The payload is the plain key, without DetectLoss's sequence number: a
// notification sent this way is not tracked for loss.
func Notify(ctx context.Context, db Execer, channel string, key shared.EntityKey) error {
	ch, payload, err := keyPayload(channel, key)
	if err != nil {
		return err
	}
	if _, err := db.Exec(ctx, notifySQL, ch, payload); err != nil {
		return fmt.Errorf("pgq: notify %s on channel %q: %w", key, ch, err)
	}
	return nil
}

// NotifySQL is Notify for database/sql: given the application's *sql.Tx,
// the notification goes out when it commits and never if it rolls back.
func NotifySQL(ctx context.Context, db SQLExecer, channel string, key shared.EntityKey) error {
	ch, payload, err := keyPayload(channel, key)
	if err != nil {
		return err
	}
	if _, err := db.ExecContext(ctx, notifySQL, ch, payload); err != nil {
		return fmt.Errorf("pgq: notify %s on channel %q: %w", key, ch, err)
	}
	return nil
}

// keyPayload checks channel (defaulted) and key and returns the payload.
func keyPayload(channel string, key shared.EntityKey) (string, string, error) {
	if channel == "" {
		channel = DefaultChannel
	}
	if err := checkChannel(channel); err != nil {
		return "", "", err
	}
	if key.Entity == "" {
		return "", "", fmt.Errorf("pgq: notify %s: the key has no entity type", key)
	}
	b, err := json.Marshal(key)
	if err != nil {
		return "", "", err
	}
	if len(b) > MaxPayload {
		return "", "", fmt.Errorf("%w: %d bytes for key %s, Postgres takes at most %d", ErrPayloadTooLarge, len(b), key, MaxPayload)
	}
	return channel, string(b), nil
}
