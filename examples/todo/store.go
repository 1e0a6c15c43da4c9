package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"modernc.org/sqlite" // the "sqlite" database/sql driver: pure Go, no cgo
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/entity-sync/entity-sync/esq/pgq"
)

// list is a todo list. Its items are what clients subscribe to.
type list struct {
	ID    string `json:"id"`
	Title string `json:"title"`
}

// item is one entry of a list, and one row of the list's entity key.
type item struct {
	ID    int64  `json:"id"`
	Title string `json:"title"`
	Done  bool   `json:"done"`
	// Version counts the item's writes: an edit that names the version its
	// user saw is refused (errConflict) if the item changed since.
	Version int64 `json:"version"`
}

// errNotFound is returned for a list or item that does not exist.
var errNotFound = errors.New("not found")

// errConflict is returned for an edit of an item whose version is no
// longer the one the edit names.
var errConflict = errors.New("changed meanwhile")

// store keeps the lists in SQL: a SQLite file (the default) or PostgreSQL.
// Every query below runs unchanged on both; only the schema differs.
type store struct {
	db *sql.DB
	// pg is the Postgres pool the queue (esq/pgq) shares; nil for SQLite.
	pg *pgxpool.Pool
	// where says what the store is, for logs and the launcher's banner.
	where string
}

const schema = `
CREATE TABLE IF NOT EXISTS todo_lists (
	id      TEXT PRIMARY KEY,
	title   TEXT NOT NULL,
	created BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS todo_items (
	id      %s,
	list_id TEXT NOT NULL REFERENCES todo_lists (id) ON DELETE CASCADE,
	title   TEXT NOT NULL,
	done    BOOLEAN NOT NULL DEFAULT FALSE,
	version BIGINT NOT NULL DEFAULT 1,
	add_key TEXT
);
CREATE INDEX IF NOT EXISTS todo_items_list ON todo_items (list_id, id);
`

// addKeyIndex makes an add's key (addItem) name at most one item of a list.
// Items added without a key (NULL) never collide. It is created after the
// columns are, since a database made before keys lacks the column.
const addKeyIndex = `CREATE UNIQUE INDEX IF NOT EXISTS todo_items_add_key ON todo_items (list_id, add_key)`

// openSQLite opens (creating if needed) dir/todo.db. Several processes may
// share the file: WAL lets readers run beside the one writer, and the busy
// timeout makes a writer wait for another's lock instead of failing with
// "database is locked".
func openSQLite(dir string) (*store, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "todo.db")
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(10000)&_pragma=foreign_keys(1)")
	if err != nil {
		return nil, err
	}
	if err := useWAL(db); err != nil {
		db.Close()
		return nil, fmt.Errorf("sqlite %s: %w", path, err)
	}
	if _, err := db.Exec(fmt.Sprintf(schema, "INTEGER PRIMARY KEY AUTOINCREMENT")); err != nil {
		db.Close()
		return nil, fmt.Errorf("sqlite %s: create schema: %w", path, err)
	}
	// A database made before items had versions or add keys gets the
	// columns (SQLite has no ADD COLUMN IF NOT EXISTS).
	for _, col := range []struct{ name, decl string }{
		{"version", "BIGINT NOT NULL DEFAULT 1"},
		{"add_key", "TEXT"},
	} {
		var has bool
		err = db.QueryRow(`SELECT COUNT(*) > 0 FROM pragma_table_info('todo_items') WHERE name = $1`, col.name).Scan(&has)
		if err == nil && !has {
			_, err = db.Exec(`ALTER TABLE todo_items ADD COLUMN ` + col.name + ` ` + col.decl)
		}
		if err != nil {
			db.Close()
			return nil, fmt.Errorf("sqlite %s: add the %s column: %w", path, col.name, err)
		}
	}
	if _, err := db.Exec(addKeyIndex); err != nil {
		db.Close()
		return nil, fmt.Errorf("sqlite %s: create the add key index: %w", path, err)
	}
	return &store{db: db, where: "SQLite " + path}, nil
}

// useWAL switches the database file to WAL mode (it stays so). SQLite
// refuses the switch while another process has the file open, at once
// (SQLITE_BUSY) rather than after the busy timeout, so servers that start
// together on a new file take turns here.
func useWAL(db *sql.DB) error {
	deadline := time.Now().Add(10 * time.Second)
	for delay := time.Millisecond; ; delay = min(2*delay, 100*time.Millisecond) {
		_, err := db.Exec(`PRAGMA journal_mode = WAL`)
		var e *sqlite.Error
		if !errors.As(err, &e) || e.Code()&0xff != sqlite3.SQLITE_BUSY || time.Now().After(deadline) {
			return err
		}
		time.Sleep(delay)
	}
}

// openPostgres connects to PostgreSQL, creates the tables if needed and
// installs the trigger that notifies a list's key whenever one of its items
// is written, by this app or any other program (psql included).
func openPostgres(ctx context.Context, connString string) (*store, error) {
	pool, err := pgxpool.New(ctx, connString)
	if err != nil {
		return nil, err
	}
	// Two servers starting together would race to create the tables and the
	// trigger; a transaction-scoped advisory lock lets one do it at a time.
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('entity-sync todo schema'))`); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, fmt.Sprintf(schema, "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")); err != nil {
			return err
		}
		// A database made before items had versions or add keys.
		if _, err := tx.Exec(ctx, `ALTER TABLE todo_items ADD COLUMN IF NOT EXISTS version BIGINT NOT NULL DEFAULT 1,
			ADD COLUMN IF NOT EXISTS add_key TEXT`); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, addKeyIndex); err != nil {
			return err
		}
		if err := pgq.ApplyTrigger(ctx, tx, pgq.Trigger{Table: "todo_items", Entity: entityList, IDColumn: "list_id"}); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, listsTrigger)
		return err
	})
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("postgres: set up the schema: %w", err)
	}
	cfg := pool.Config().ConnConfig
	return &store{
		db:    stdlib.OpenDBFromPool(pool),
		pg:    pool,
		where: fmt.Sprintf("PostgreSQL %s:%d/%s", cfg.Host, cfg.Port, cfg.Database),
	}, nil
}

// listsTrigger makes any write to todo_lists (a list created, or renamed
// with psql) notify the home page's key, once per statement: every write
// changes the same key, so per-row notifications would only repeat it.
var listsTrigger = fmt.Sprintf(`
CREATE OR REPLACE FUNCTION todo_lists_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	PERFORM pg_notify('%s', '{"entity":"%s","id":"%s"}');
	RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS todo_lists_notify ON todo_lists;
CREATE TRIGGER todo_lists_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON todo_lists
	FOR EACH STATEMENT EXECUTE FUNCTION todo_lists_notify();
`, pgq.DefaultChannel, entityLists, listsRecent)

// notifiesItself reports whether the database announces item changes on its
// own (Postgres: the trigger, at commit), so the app must not.
func (s *store) notifiesItself() bool { return s.pg != nil }

func (s *store) Close() error {
	err := s.db.Close()
	if s.pg != nil {
		s.pg.Close()
	}
	return err
}

// createList stores a new list under a random id (the id is its URL).
func (s *store) createList(ctx context.Context, title string) (list, error) {
	b := make([]byte, 5)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	l := list{ID: hex.EncodeToString(b), Title: title}
	_, err := s.db.ExecContext(ctx, `INSERT INTO todo_lists (id, title, created) VALUES ($1, $2, $3)`,
		l.ID, l.Title, time.Now().UnixNano())
	return l, err
}

// lists returns the 50 newest lists.
func (s *store) lists(ctx context.Context) ([]list, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, title FROM todo_lists ORDER BY created DESC LIMIT 50`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	ls := []list{}
	for rows.Next() {
		var l list
		if err := rows.Scan(&l.ID, &l.Title); err != nil {
			return nil, err
		}
		ls = append(ls, l)
	}
	return ls, rows.Err()
}

func (s *store) list(ctx context.Context, id string) (list, error) {
	l := list{ID: id}
	err := s.db.QueryRowContext(ctx, `SELECT title FROM todo_lists WHERE id = $1`, id).Scan(&l.Title)
	if errors.Is(err, sql.ErrNoRows) {
		return l, errNotFound
	}
	return l, err
}

// items returns a list's items, oldest first; none for an unknown list.
func (s *store) items(ctx context.Context, listID string) ([]item, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, title, done, version FROM todo_items WHERE list_id = $1 ORDER BY id`, listID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var its []item
	for rows.Next() {
		var it item
		if err := rows.Scan(&it.ID, &it.Title, &it.Done, &it.Version); err != nil {
			return nil, err
		}
		its = append(its, it)
	}
	return its, rows.Err()
}

// addItem appends an item to a list; errNotFound if there is no such list.
//
// key, unless empty, makes the add idempotent: a client that sends an add
// again because it got no answer (the connection was cut) cannot tell
// whether the first attempt was saved, so it sends the same key, and an add
// whose key the list already holds inserts nothing and returns that item, as
// it is now. The key lives with its item: once the item is deleted, the key
// is free again.
func (s *store) addItem(ctx context.Context, listID, title, key string) (it item, err error) {
	var addKey any // NULL for no key: never a conflict
	if key != "" {
		addKey = key
	}
	it = item{Title: title, Version: 1}
	// One statement inserts or finds the key taken, so two attempts racing
	// each other (the second sent while the first is still running) save
	// one item: the loser waits for the winner's row and inserts nothing.
	err = s.db.QueryRowContext(ctx, `INSERT INTO todo_items (list_id, title, add_key)
		SELECT id, $2, $3 FROM todo_lists WHERE id = $1
		ON CONFLICT (list_id, add_key) DO NOTHING RETURNING id`, listID, title, addKey).Scan(&it.ID)
	if !errors.Is(err, sql.ErrNoRows) {
		return it, err
	}
	// No row inserted: no such list, or the key is taken.
	if key != "" {
		err = s.db.QueryRowContext(ctx, `SELECT id, title, done, version FROM todo_items WHERE list_id = $1 AND add_key = $2`, listID, key).
			Scan(&it.ID, &it.Title, &it.Done, &it.Version)
		if !errors.Is(err, sql.ErrNoRows) {
			return it, err
		}
	}
	return it, errNotFound
}

// updateItem changes an item's title and/or done flag (nil: unchanged) and
// counts the write in its version. With version set, only if the item is
// still at that version: otherwise errConflict, with the item as it is now.
func (s *store) updateItem(ctx context.Context, listID string, id int64, title *string, done *bool, version *int64) (item, error) {
	var newTitle, newDone, seen any // SQL NULL where nil, which COALESCE skips
	if title != nil {
		newTitle = *title
	}
	if done != nil {
		newDone = *done
	}
	if version != nil {
		seen = *version
	}
	// One statement checks and writes, so no other write can slip between.
	var it item
	err := s.db.QueryRowContext(ctx, `UPDATE todo_items
		SET title = COALESCE($3, title), done = COALESCE($4, done), version = version + 1
		WHERE list_id = $1 AND id = $2 AND version = COALESCE($5, version)
		RETURNING id, title, done, version`, listID, id, newTitle, newDone, seen).
		Scan(&it.ID, &it.Title, &it.Done, &it.Version)
	if !errors.Is(err, sql.ErrNoRows) {
		return it, err
	}
	if version == nil {
		return it, errNotFound
	}
	// Refused: no such item, or another version of it.
	err = s.db.QueryRowContext(ctx, `SELECT id, title, done, version FROM todo_items WHERE list_id = $1 AND id = $2`, listID, id).
		Scan(&it.ID, &it.Title, &it.Done, &it.Version)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return it, errNotFound
	case err != nil:
		return it, err
	}
	return it, errConflict
}

func (s *store) deleteItem(ctx context.Context, listID string, id int64) error {
	res, err := s.db.ExecContext(ctx, `DELETE FROM todo_items WHERE list_id = $1 AND id = $2`, listID, id)
	if err != nil {
		return err
	}
	if n, err := res.RowsAffected(); err != nil {
		return err
	} else if n == 0 {
		return errNotFound
	}
	return nil
}
