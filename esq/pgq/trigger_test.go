package pgq_test

import (
	"database/sql"
	"os/exec"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx", for NotifySQL

	"github.com/entity-sync/entity-sync/esq/pgq"
	"github.com/entity-sync/entity-sync/internal/pgtest"
	"github.com/entity-sync/entity-sync/shared"
)

// plainSQL runs a script as another program would: with psql when it is
// installed, else as one simple-protocol statement on its own connection.
func plainSQL(t *testing.T, pool *pgxpool.Pool, script string) {
	t.Helper()
	if path, err := exec.LookPath("psql"); err == nil {
		out, err := exec.CommandContext(ctxT(t), path, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", pgtest.DSN(), "-c", script).CombinedOutput()
		if err != nil {
			t.Fatalf("psql -c %q: %v\n%s", script, err, out)
		}
		return
	}
	if _, err := pool.Exec(ctxT(t), script); err != nil {
		t.Fatalf("%s: %v", script, err)
	}
}

// Writes from plain SQL, outside the Go program, reach subscribers through
// the trigger; names that need quoting are quoted.
func TestTriggerNotifiesPlainSQLWrites(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t)
	schema := pgtest.Schema(t, pool)
	ch := pgtest.Name(t, "es_chan_")
	q := newQueue(t, ch, nil)
	r := subscribe(t, q, "items")
	numbers := subscribe(t, q, "numbers")

	table, idCol := `Odd "Items"'s`, `Item ID`
	tbl := pgx.Identifier{schema, table}.Sanitize()
	id := pgx.Identifier{idCol}.Sanitize()
	pgtest.Exec(t, pool, "CREATE TABLE "+tbl+" ("+id+" text PRIMARY KEY, name text)")
	pgtest.Exec(t, pool, "CREATE TABLE "+schema+".nums (n bigint PRIMARY KEY)")
	tr := pgq.Trigger{Schema: schema, Table: table, Entity: "items", IDColumn: idCol, Channel: ch}
	if err := pgq.ApplyTrigger(ctxT(t), pool, tr); err != nil {
		t.Fatal(err)
	}
	if err := pgq.ApplyTrigger(ctxT(t), pool, tr); err != nil { // again: harmless
		t.Fatalf("applied twice: %v", err)
	}
	if err := pgq.ApplyTrigger(ctxT(t), pool, pgq.Trigger{Schema: schema, Table: "nums", Entity: "numbers", IDColumn: "n", Channel: ch}); err != nil {
		t.Fatal(err)
	}

	plainSQL(t, pool, "INSERT INTO "+tbl+" VALUES ('1', 'one')")
	r.expect(t, keyJSON("items", "1"))
	plainSQL(t, pool, "UPDATE "+tbl+" SET name = 'uno' WHERE "+id+" = '1'")
	r.expect(t, keyJSON("items", "1"))
	// A changed id: the new key and the old one.
	plainSQL(t, pool, "UPDATE "+tbl+" SET "+id+" = '2' WHERE "+id+" = '1'")
	r.expect(t, keyJSON("items", "2"), keyJSON("items", "1"))
	plainSQL(t, pool, "DELETE FROM "+tbl+" WHERE "+id+" = '2'")
	r.expect(t, keyJSON("items", "2"))
	// Rolled back: nothing. Several rows in one transaction: each key.
	plainSQL(t, pool, "BEGIN; INSERT INTO "+tbl+" VALUES ('3', 'three'); ROLLBACK;")
	plainSQL(t, pool, "INSERT INTO "+tbl+` VALUES ('4', 'four'), ('5', 'five'), ('a"b\c', 'quote')`)
	plainSQL(t, pool, "INSERT INTO "+schema+".nums VALUES (42)")
	r.expect(t, keyJSON("items", "4"), keyJSON("items", "5"), keyJSON("items", `a"b\c`))
	numbers.expect(t, keyJSON("numbers", "42"))

	// A column that does not exist is refused when the trigger is applied.
	err := pgq.ApplyTrigger(ctxT(t), pool, pgq.Trigger{Schema: schema, Table: table, Entity: "items", IDColumn: "nope", Channel: ch, Name: "other"})
	if err == nil || !strings.Contains(err.Error(), "has no column") {
		t.Errorf("trigger on a missing column: %v", err)
	}
}

// NotifySQL in a database/sql transaction: nothing on rollback, delivered
// at commit.
func TestNotifySQLInTransaction(t *testing.T) {
	t.Parallel()
	ch := pgtest.Name(t, "es_chan_")
	q := newQueue(t, ch, nil)
	r := subscribe(t, q, "items")
	db, err := sql.Open("pgx", pgtest.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := ctxT(t)
	for _, commit := range []bool{false, true} {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		id := map[bool]string{false: "rolled-back", true: "committed"}[commit]
		if err := pgq.NotifySQL(ctx, tx, ch, shared.EntityKey{Entity: "items", ID: id}); err != nil {
			t.Fatal(err)
		}
		if commit {
			err = tx.Commit()
		} else {
			err = tx.Rollback()
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := pgq.NotifySQL(ctx, db, ch, shared.EntityKey{Entity: "items", ID: "sentinel"}); err != nil {
		t.Fatal(err)
	}
	r.expect(t, keyJSON("items", "committed"), keyJSON("items", "sentinel"))
}
