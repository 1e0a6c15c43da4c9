// Package esdb is the registry of entity handlers: for each entity type, how
// to fetch the rows a key stands for. The bridge asks it once per change.
package esdb

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/shared"
)

// FetchFunc returns the rows that make up the entity's current state, each a
// block of bytes sent to clients as is (usually JSON). Zero rows mean the
// entity is gone. It is called once per change per server, whatever the
// number of subscribers, so it must not depend on who is asking.
type FetchFunc func(ctx context.Context, key shared.EntityKey) ([][]byte, error)

// ErrUnknownEntity is returned for an entity type nobody registered.
var ErrUnknownEntity = errors.New("esdb: entity type not registered")

// DatabaseHub maps entity types to their fetch functions. It is safe for
// concurrent use.
type DatabaseHub struct {
	// Logger receives PullDataAndPush's errors (the seed's signature has
	// no room for them). Default: logrus's standard logger.
	Logger logrus.FieldLogger

	mu      sync.RWMutex
	entries map[shared.EntityType]entry
}

type entry struct {
	fetch FetchFunc              // secret-independent: one call per change
	seed  shared.SecretDBHandler // the seed's handler: one call per distinct secret
	rowID RowID                  // set for a collection: names each row
}

// NewDatabaseHub returns an empty registry.
func NewDatabaseHub() *DatabaseHub {
	return &DatabaseHub{entries: make(map[shared.EntityType]entry)}
}

// Register sets the fetch function for an entity type.
func (d *DatabaseHub) Register(entity shared.EntityType, fetch FetchFunc) error {
	if fetch == nil {
		return fmt.Errorf("esdb: nil fetch function for entity type %q", entity)
	}
	return d.add(entity, entry{fetch: fetch})
}

// RegisterCollection sets the fetch function for an entity type whose keys
// are collections (a list, a board, the rows of a user): id names each row
// the fetch returns, so that clients speaking the envelope protocol receive,
// after the first full state, only the rows added, changed or removed (see
// docs/protocol.md). Ids must be unique within one fetch; a row whose id is
// empty, cannot be read or repeats one is an application bug: the bridge
// logs it and names the row "#<index>" (its position in the fetch).
func (d *DatabaseHub) RegisterCollection(entity shared.EntityType, fetch FetchFunc, id RowID) error {
	if fetch == nil {
		return fmt.Errorf("esdb: nil fetch function for entity type %q", entity)
	}
	if id == nil {
		return fmt.Errorf("esdb: nil row id function for collection %q", entity)
	}
	return d.add(entity, entry{fetch: fetch, rowID: id})
}

// AddDataPullAndPushHandler sets the seed's secret-taking handler for an
// entity type. Its rows may differ by secret, so the bridge calls it once per
// distinct secret among a key's subscribers rather than once per change.
func (d *DatabaseHub) AddDataPullAndPushHandler(entity shared.EntityType, handler shared.SecretDBHandler) error {
	if handler == nil {
		return fmt.Errorf("esdb: nil handler for entity type %q", entity)
	}
	return d.add(entity, entry{seed: handler})
}

func (d *DatabaseHub) add(entity shared.EntityType, e entry) error {
	if entity == "" {
		return errors.New("esdb: empty entity type")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.entries[entity]; ok {
		return fmt.Errorf("esdb: entity type %q registered twice", entity)
	}
	d.entries[entity] = e
	return nil
}

// Unregister removes an entity type; a no-op if it is not registered.
func (d *DatabaseHub) Unregister(entity shared.EntityType) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.entries, entity)
}

func (d *DatabaseHub) lookup(entity shared.EntityType) (entry, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	e, ok := d.entries[entity]
	return e, ok
}

// Has reports whether the entity type is registered.
func (d *DatabaseHub) Has(entity shared.EntityType) bool {
	_, ok := d.lookup(entity)
	return ok
}

// RowID returns the row id function of an entity type registered with
// RegisterCollection, or nil.
func (d *DatabaseHub) RowID(entity shared.EntityType) RowID {
	e, _ := d.lookup(entity)
	return e.rowID
}

// PerSecret reports whether the entity's rows may depend on the client's
// secret, which is the case for handlers registered the seed's way.
func (d *DatabaseHub) PerSecret(entity shared.EntityType) bool {
	e, _ := d.lookup(entity)
	return e.seed != nil
}

// Fetch returns the key's rows as seen with secret (ignored for entities
// registered with Register). A panicking handler is turned into an error so
// one bad lookup cannot take the server down.
func (d *DatabaseHub) Fetch(ctx context.Context, key shared.EntityKey, secret string) (rows [][]byte, err error) {
	e, ok := d.lookup(key.Entity)
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrUnknownEntity, key.Entity)
	}
	if e.fetch != nil {
		defer func() {
			if r := recover(); r != nil {
				rows, err = nil, fmt.Errorf("esdb: handler for %s panicked: %v", key, r)
			}
		}()
		return e.fetch(ctx, key)
	}
	return SeedLookup(e.seed).Fetch(ctx, key, secret)
}

// SeedLookup adapts a seed-style lookup (a handler registered with
// AddDataPullAndPushHandler, or PullDataAndPush itself) to the bridge's
// fetch: each call of the row handler is one row, copied, and a panic is
// returned as an error. Its rows may depend on the secret.
type SeedLookup shared.SecretDBHandler

// Fetch runs the lookup for key and secret and collects its rows.
func (f SeedLookup) Fetch(_ context.Context, key shared.EntityKey, secret string) (rows [][]byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			rows, err = nil, fmt.Errorf("esdb: handler for %s panicked: %v", key, r)
		}
	}()
	f(key, secret, func(b []byte) { rows = append(rows, append([]byte(nil), b...)) })
	return rows, nil
}

// PerSecret is true: a seed lookup takes the secret.
func (SeedLookup) PerSecret(shared.EntityType) bool { return true }

// PullDataAndPush is the seed's lookup entry point: it runs the entity's
// handler for key and secret and hands every row to handler. The seed's
// signature has no room for an error, so one is logged; use Fetch instead.
func (d *DatabaseHub) PullDataAndPush(key shared.EntityKey, secret string, handler shared.ByteHandler) {
	rows, err := d.Fetch(context.Background(), key, secret)
	if err != nil {
		log := d.Logger
		if log == nil {
			log = logrus.StandardLogger()
		}
		log.WithError(err).WithField("key", key.String()).Error("esdb: lookup failed")
		return
	}
	for _, r := range rows {
		handler(r)
	}
}
