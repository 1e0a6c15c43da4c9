// Command postgres is an entity-sync server that uses PostgreSQL as its bus:
// run several on different ports against one database and they push to each
// other's clients. It serves the table items (created if missing) with a
// trigger, so a write from psql pushes too, and POST /price?id=..&price=..
// writes in a transaction that notifies at commit.
//
//	go run ./examples/postgres -addr 127.0.0.1:8080
//	go run ./examples/basic/client                      # subscribes to items/100
//	curl -d 'id=100&price=7' http://127.0.0.1:8080/price
//	psql -h 127.0.0.1 -U postgres test -c "UPDATE items SET price = 9 WHERE id = '100'"
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"log"
	"net/http"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esq/pgq"
	"github.com/entity-sync/entity-sync/shared"
)

func main() {
	db := flag.String("db", "postgres://postgres@127.0.0.1:5432/test", "PostgreSQL connection string")
	addr := flag.String("addr", "127.0.0.1:8080", "HTTP address (websocket at /ws/entity-sync/)")
	flag.Parse()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, *db)
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	_, err = pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS items (id text PRIMARY KEY, price int NOT NULL)`)
	if err != nil {
		log.Fatal(err)
	}
	// Writes from anywhere (psql, migrations, other programs) notify too.
	if err := pgq.ApplyTrigger(ctx, pool, pgq.Trigger{Table: "items", Entity: "items", IDColumn: "id"}); err != nil {
		log.Fatal(err)
	}

	q, err := pgq.New(ctx, pgq.Config{Pool: pool}) // LISTENs on channel entity_sync
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
		err := pool.QueryRow(ctx, `SELECT to_json(items) FROM items WHERE id = $1`, key.ID).Scan(&row)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, nil // deleted
		}
		return [][]byte{row}, err
	})
	if err != nil {
		log.Fatal(err)
	}

	// A write in Go, notified inside its transaction: pushed at commit,
	// never on rollback. (The trigger notifies it too: Postgres folds the
	// two identical notifications into one.)
	http.HandleFunc("/price", func(w http.ResponseWriter, r *http.Request) {
		err := pgx.BeginFunc(r.Context(), pool, func(tx pgx.Tx) error {
			id := r.FormValue("id")
			if _, err := tx.Exec(r.Context(), `INSERT INTO items VALUES ($1, $2)
				ON CONFLICT (id) DO UPDATE SET price = EXCLUDED.price`, id, r.FormValue("price")); err != nil {
				return err
			}
			return pgq.Notify(r.Context(), tx, q.Channel(), shared.EntityKey{Entity: "items", ID: id})
		})
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		}
	})
	http.Handle("/", es.Mux) // websocket clients: /ws/entity-sync/
	log.Printf("serving on %s, channel %s", *addr, q.Channel())
	log.Fatal(http.ListenAndServe(*addr, nil))
}
