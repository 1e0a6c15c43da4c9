// Package pgtest gives tests a real PostgreSQL: the machine's, at
// 127.0.0.1:5432 (.ci/run starts it), or the one ES_PG_DSN names. Each test
// gets its own notification channel and schema, so parallel runs do not
// cross.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// DefaultDSN is the database the tests use unless ES_PG_DSN says otherwise.
const DefaultDSN = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

// DSN returns the connection string of the test database.
func DSN() string {
	if s := os.Getenv("ES_PG_DSN"); s != "" {
		return s
	}
	return DefaultDSN
}

var (
	reachOnce sync.Once
	reachErr  error
)

// Require skips the test when Postgres cannot be reached, saying how to fix
// it, except under CI (CI set: .ci/run starts Postgres, so there it must
// answer), where it fails the test.
func Require(t testing.TB) {
	t.Helper()
	reachOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, DSN())
		if err != nil {
			reachErr = err
			return
		}
		reachErr = conn.Ping(ctx)
		_ = conn.Close(ctx)
	})
	if reachErr == nil {
		return
	}
	msg := fmt.Sprintf("PostgreSQL not reachable at %s: %v; start it (pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start, as .ci/run does) or point ES_PG_DSN at another", DSN(), reachErr)
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// Name returns a fresh lower-case identifier starting with prefix, for a
// channel or a schema of one test.
func Name(t testing.TB, prefix string) string {
	t.Helper()
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return prefix + hex.EncodeToString(b)
}

// Pool returns a pool on the test database, closed when the test ends.
func Pool(t testing.TB) *pgxpool.Pool {
	t.Helper()
	Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, err := pgxpool.New(ctx, DSN())
	if err != nil {
		t.Fatalf("pool: %v", err)
	}
	t.Cleanup(p.Close)
	return p
}

// Schema creates a fresh schema, dropped with everything in it when the test
// ends, and returns its name.
func Schema(t testing.TB, db *pgxpool.Pool) string {
	t.Helper()
	name := Name(t, "es_test_")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := db.Exec(ctx, "CREATE SCHEMA "+name); err != nil {
		t.Fatalf("create schema: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := db.Exec(ctx, "DROP SCHEMA "+name+" CASCADE"); err != nil {
			t.Errorf("drop schema %s: %v", name, err)
		}
	})
	return name
}

// Exec runs sql with args, failing the test on error.
func Exec(t testing.TB, db *pgxpool.Pool, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := db.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// Terminate ends the backend pid with pg_terminate_backend, as an
// administrator would, and waits until it is gone.
func Terminate(t testing.TB, db *pgxpool.Pool, pid uint32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var ok bool
	// With a timeout, pg_terminate_backend waits for the backend to exit.
	if err := db.QueryRow(ctx, "SELECT pg_terminate_backend($1, 5000)", int32(pid)).Scan(&ok); err != nil {
		t.Fatalf("pg_terminate_backend(%d): %v", pid, err)
	}
	if !ok {
		t.Fatalf("pg_terminate_backend(%d): no such backend", pid)
	}
}
