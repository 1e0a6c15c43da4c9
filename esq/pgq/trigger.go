package pgq

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/entity-sync/entity-sync/shared"
)

// Trigger describes a trigger that notifies the key of every row written to
// a table, whatever program writes it (psql, a migration, a job in another
// language): after each INSERT, UPDATE and DELETE, it sends
// {"entity":"<Entity>","id":"<the row's IDColumn as text>"} on Channel,
// within the writing transaction (so at commit, never on rollback). An
// UPDATE that changes the id notifies both the old and the new key. TRUNCATE
// notifies nothing.
type Trigger struct {
	// Schema is the table's schema; empty: the table is found on the
	// search_path. The trigger function, entity_sync_notify(), is created
	// in this schema too (empty: the first schema of the search_path).
	Schema string
	// Table is the table's name (required), as it is stored: "Items" and
	// "items" are two tables.
	Table string
	// Entity is the entity type the rows are (required).
	Entity shared.EntityType
	// IDColumn is the column whose value, as text, is the key's id. Default
	// "id".
	IDColumn string
	// Channel is the channel notified. Default DefaultChannel.
	Channel string
	// Name is the trigger's name. Default "entity_sync_notify": give
	// another to notify one table as two entity types.
	Name string
}

// triggerFunction is the body of entity_sync_notify(), shared by every
// table. Its arguments are the channel, the entity type and the id column.
const triggerFunction = `
DECLARE
	old_id text;
	new_id text;
BEGIN
	IF TG_OP <> 'INSERT' THEN
		old_id := to_jsonb(OLD) ->> TG_ARGV[2];
	END IF;
	IF TG_OP <> 'DELETE' THEN
		new_id := to_jsonb(NEW) ->> TG_ARGV[2];
	END IF;
	IF new_id IS NOT NULL THEN
		PERFORM pg_notify(TG_ARGV[0], '{"entity":' || to_json(TG_ARGV[1])::text || ',"id":' || to_json(new_id)::text || '}');
	END IF;
	IF old_id IS NOT NULL AND old_id IS DISTINCT FROM new_id THEN
		PERFORM pg_notify(TG_ARGV[0], '{"entity":' || to_json(TG_ARGV[1])::text || ',"id":' || to_json(old_id)::text || '}');
	END IF;
	RETURN NULL;
END
`

// TriggerSQL returns the SQL that installs the trigger (for a migration, or
// psql): it creates or replaces the function entity_sync_notify(), checks
// that the table has the id column, and (re)creates the trigger. Every
// identifier is quoted and every value is a literal, so names need no
// care. Run it as one script (it then runs in one transaction) on
// PostgreSQL 11 or later; re-running it is harmless.
func TriggerSQL(tr Trigger) (string, error) {
	if tr.Table == "" || tr.Entity == "" {
		return "", fmt.Errorf("pgq: Trigger needs Table and Entity (got table %q, entity %q)", tr.Table, tr.Entity)
	}
	if tr.IDColumn == "" {
		tr.IDColumn = "id"
	}
	if tr.Channel == "" {
		tr.Channel = DefaultChannel
	}
	if tr.Name == "" {
		tr.Name = "entity_sync_notify"
	}
	if err := checkChannel(tr.Channel); err != nil {
		return "", err
	}
	for _, s := range []string{tr.Schema, tr.Table, string(tr.Entity), tr.IDColumn, tr.Name} {
		if strings.IndexByte(s, 0) >= 0 {
			return "", fmt.Errorf("pgq: Trigger names must not hold a NUL byte (%q)", s)
		}
	}
	var table, function string
	if tr.Schema != "" {
		table = pgx.Identifier{tr.Schema, tr.Table}.Sanitize()
		function = pgx.Identifier{tr.Schema, "entity_sync_notify"}.Sanitize()
	} else {
		table = pgx.Identifier{tr.Table}.Sanitize()
		function = pgx.Identifier{"entity_sync_notify"}.Sanitize()
	}
	check := fmt.Sprintf(`
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = %[1]s::regclass AND attname = %[2]s AND attnum > 0 AND NOT attisdropped) THEN
		RAISE EXCEPTION 'entity_sync: table %% has no column %%', %[1]s::regclass, %[2]s;
	END IF;
END
`, quoteLiteral(table), quoteLiteral(tr.IDColumn))
	name := pgx.Identifier{tr.Name}.Sanitize()
	var b strings.Builder
	fmt.Fprintf(&b, "CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql AS %s;\n", function, dollarQuote(triggerFunction))
	fmt.Fprintf(&b, "DO %s;\n", dollarQuote(check))
	fmt.Fprintf(&b, "DROP TRIGGER IF EXISTS %s ON %s;\n", name, table)
	fmt.Fprintf(&b, "CREATE TRIGGER %s AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION %s(%s, %s, %s);\n",
		name, table, function, quoteLiteral(tr.Channel), quoteLiteral(string(tr.Entity)), quoteLiteral(tr.IDColumn))
	return b.String(), nil
}

// ApplyTrigger runs TriggerSQL's script through db (a pool, a connection or
// a transaction), in one transaction of its own unless db is one. Apply it
// from one place (a migration): servers replacing the function concurrently
// can fail with "tuple concurrently updated".
func ApplyTrigger(ctx context.Context, db Execer, tr Trigger) error {
	script, err := TriggerSQL(tr)
	if err != nil {
		return err
	}
	// Without arguments pgx sends the script with the simple query protocol,
	// which runs it as one implicit transaction.
	if _, err := db.Exec(ctx, script); err != nil {
		return fmt.Errorf("pgq: apply the trigger on %s: %w", tr.Table, err)
	}
	return nil
}

// quoteLiteral returns s as an SQL string literal, whatever
// standard_conforming_strings says.
func quoteLiteral(s string) string {
	s = strings.ReplaceAll(s, "'", "''")
	if strings.Contains(s, `\`) {
		return "E'" + strings.ReplaceAll(s, `\`, `\\`) + "'"
	}
	return "'" + s + "'"
}

// dollarQuote returns body between dollar quotes whose tag body does not
// hold.
func dollarQuote(body string) string {
	tag := "$entity_sync$"
	for i := 1; strings.Contains(body, tag); i++ {
		tag = fmt.Sprintf("$entity_sync%d$", i)
	}
	return tag + body + tag
}
