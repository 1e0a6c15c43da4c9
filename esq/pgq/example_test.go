package pgq_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"net/http"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esq/pgq"
	"github.com/entity-sync/entity-sync/shared"
)

// Every server of the application runs this: Postgres carries the change
// notifications between them, and each change is notified inside the
// transaction that makes it.
func Example() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, "postgres://app@127.0.0.1:5432/app")
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	// The queue publishes through the application's pool and LISTENs on a
	// connection of its own.
	q, err := pgq.New(ctx, pgq.Config{Pool: pool})
	if err != nil {
		log.Fatal(err)
	}
	es, err := entitysync.New(entitysync.Config{Queue: q}) // es.Close closes q
	if err != nil {
		log.Fatal(err)
	}
	defer es.Close(ctx)
	err = es.Register("items", func(ctx context.Context, key shared.EntityKey) ([][]byte, error) {
		var row json.RawMessage
		err := pool.QueryRow(ctx, "SELECT to_json(items) FROM items WHERE id = $1", key.ID).Scan(&row)
		if err == pgx.ErrNoRows {
			return nil, nil // deleted
		}
		return [][]byte{row}, err
	})
	if err != nil {
		log.Fatal(err)
	}

	// Writes by other programs (psql, migrations, jobs in other languages)
	// notify too, through a trigger. Usually a migration applies it.
	if err := pgq.ApplyTrigger(ctx, pool, pgq.Trigger{Table: "items", Entity: "items"}); err != nil {
		log.Fatal(err)
	}

	// A write in Go, notified in its own transaction: the push goes out
	// at commit, and never if the transaction rolls back. (Here the
	// trigger would notify it as well; Postgres folds the two identical
	// notifications into one.)
	http.HandleFunc("/price", func(w http.ResponseWriter, r *http.Request) {
		tx, err := pool.Begin(r.Context())
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer tx.Rollback(r.Context())
		id := r.FormValue("id")
		if _, err := tx.Exec(r.Context(), "UPDATE items SET price = $1 WHERE id = $2", r.FormValue("price"), id); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if err := pgq.Notify(r.Context(), tx, q.Channel(), shared.EntityKey{Entity: "items", ID: id}); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if err := tx.Commit(r.Context()); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		}
	})
	http.Handle("/", es.Mux)
	log.Fatal(http.ListenAndServe(":8080", nil))
}

// The SQL that TriggerSQL returns, for a migration tool or psql.
func ExampleTriggerSQL() {
	script, err := pgq.TriggerSQL(pgq.Trigger{Schema: "shop", Table: "items", Entity: "items", IDColumn: "id"})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Print(script)
	// Output:
	// CREATE OR REPLACE FUNCTION "shop"."entity_sync_notify"() RETURNS trigger LANGUAGE plpgsql AS $entity_sync$
	// DECLARE
	// 	old_id text;
	// 	new_id text;
	// BEGIN
	// 	IF TG_OP <> 'INSERT' THEN
	// 		old_id := to_jsonb(OLD) ->> TG_ARGV[2];
	// 	END IF;
	// 	IF TG_OP <> 'DELETE' THEN
	// 		new_id := to_jsonb(NEW) ->> TG_ARGV[2];
	// 	END IF;
	// 	IF new_id IS NOT NULL THEN
	// 		PERFORM pg_notify(TG_ARGV[0], '{"entity":' || to_json(TG_ARGV[1])::text || ',"id":' || to_json(new_id)::text || '}');
	// 	END IF;
	// 	IF old_id IS NOT NULL AND old_id IS DISTINCT FROM new_id THEN
	// 		PERFORM pg_notify(TG_ARGV[0], '{"entity":' || to_json(TG_ARGV[1])::text || ',"id":' || to_json(old_id)::text || '}');
	// 	END IF;
	// 	RETURN NULL;
	// END
	// $entity_sync$;
	// DO $entity_sync$
	// BEGIN
	// 	IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '"shop"."items"'::regclass AND attname = 'id' AND attnum > 0 AND NOT attisdropped) THEN
	// 		RAISE EXCEPTION 'entity_sync: table % has no column %', '"shop"."items"'::regclass, 'id';
	// 	END IF;
	// END
	// $entity_sync$;
	// DROP TRIGGER IF EXISTS "entity_sync_notify" ON "shop"."items";
	// CREATE TRIGGER "entity_sync_notify" AFTER INSERT OR UPDATE OR DELETE ON "shop"."items" FOR EACH ROW EXECUTE FUNCTION "shop"."entity_sync_notify"('entity_sync', 'items', 'id');
}
