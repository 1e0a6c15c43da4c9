// Package entitysync wires the parts of entity-sync together in one call:
// a queue (NSQ, or in-process when no NSQ address is given), the entity
// registry, the bridge and the websocket endpoint on a gorilla/mux router.
package entitysync

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/gorilla/mux"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esweb"
	"github.com/entity-sync/entity-sync/shared"
)

// Config is everything Setup and New need. Only Mux is commonly set; with no
// queue settings at all, an in-process queue serves a single server.
type Config struct {
	// Mux is the router the websocket endpoint is added to, at shared.WebsocketPath
	// (/ws/entity-sync/). Default: a new router, available as EntitySync.Mux.
	Mux *mux.Router
	// NSQAddr is the nsqd TCP address ("127.0.0.1:4150") to publish to and,
	// without NSQLookupdAddrs, to consume from. Kept from the seed; NSQDAddrs
	// takes several.
	NSQAddr string
	// NSQDAddrs are further nsqd TCP addresses (see esq.NSQConfig.NSQDAddrs).
	NSQDAddrs []string
	// NSQLookupdAddrs are nsqlookupd HTTP addresses: consumers discover nsqd
	// through them (see esq.NSQConfig.LookupdHTTPAddrs).
	NSQLookupdAddrs []string
	// NSQ holds the remaining NSQ settings (topic prefix, intervals); its
	// address fields are filled from the ones above.
	NSQ esq.NSQConfig
	// Queue, if set, is used instead of NSQ or the in-process queue.
	Queue esq.Queue
	// DisableLossDetection turns off loss detection (esq.DetectLoss), on by
	// default for every queue but the in-process one (which cannot lose a
	// notification, so it has none): each notification carries its publisher's
	// sequence number, and a server that finds one missing re-fetches the
	// entity type's subscribed keys. Turn it off if other programs consume
	// the topics and cannot take the extra "_es" field or the marks (small
	// messages without a key).
	DisableLossDetection bool
	// WSPassThrough receives websocket frames that carry no action, with the
	// connection's secret.
	WSPassThrough shared.PassThrough
	// Web tunes the websocket transport; its PassThrough is taken from
	// WSPassThrough when that is set.
	Web esweb.Options
	// Bridge tunes the bridge (fetch concurrency, timeouts, retries).
	Bridge esbridge.Options
	// Logger receives every part's log lines. Default: logrus's standard
	// logger.
	Logger logrus.FieldLogger
}

// EntitySync is a wired entity-sync server.
type EntitySync struct {
	// Mux is the router the websocket endpoint was added to.
	Mux *mux.Router
	// Bridge is the core; call Bridge.NotifyAllOfChange after a write.
	Bridge *esbridge.Bridge
	// DatabaseHub holds the registered entity handlers.
	DatabaseHub *esdb.DatabaseHub
	// Web is the websocket transport.
	Web *esweb.Server

	err error // set by Setup when New failed: every method returns it

	queue   esq.Queue    // as the bridge uses it, for Ready
	served  atomic.Int32 // entity types registered, for Ready
	closing atomic.Bool  // Close was called, for Ready
}

// New builds an EntitySync from config, or explains why it cannot.
func New(config Config) (*EntitySync, error) {
	if config.Logger == nil {
		config.Logger = logrus.StandardLogger()
	}
	if config.Mux == nil {
		config.Mux = mux.NewRouter()
	}
	queue, err := buildQueue(&config)
	if err != nil {
		return nil, err
	}
	if !config.DisableLossDetection {
		queue = esq.DetectLoss(queue, config.Logger)
	}
	hub := esdb.NewDatabaseHub()
	hub.Logger = config.Logger
	if config.Bridge.Logger == nil {
		config.Bridge.Logger = config.Logger
	}
	bridge := esbridge.New(queue, hub, config.Bridge)
	if config.WSPassThrough != nil {
		config.Web.PassThrough = esweb.SeedPassThrough(config.WSPassThrough)
	}
	if config.Web.Logger == nil {
		config.Web.Logger = config.Logger
	}
	web := esweb.NewServer(bridge.ClientBuilder, config.Web)
	config.Mux.Handle(shared.WebsocketPath, web)
	return &EntitySync{Mux: config.Mux, Bridge: bridge, DatabaseHub: hub, Web: web, queue: queue}, nil
}

func buildQueue(config *Config) (esq.Queue, error) {
	if config.Queue != nil {
		return config.Queue, nil
	}
	nsqCfg := config.NSQ
	if config.NSQAddr != "" {
		nsqCfg.NSQDAddrs = append([]string{config.NSQAddr}, nsqCfg.NSQDAddrs...)
	}
	nsqCfg.NSQDAddrs = append(nsqCfg.NSQDAddrs, config.NSQDAddrs...)
	nsqCfg.LookupdHTTPAddrs = append(nsqCfg.LookupdHTTPAddrs, config.NSQLookupdAddrs...)
	if len(nsqCfg.NSQDAddrs) == 0 && len(nsqCfg.LookupdHTTPAddrs) == 0 {
		return esq.NewMemory(), nil
	}
	if nsqCfg.Logger == nil {
		nsqCfg.Logger = config.Logger
	}
	return esq.NewNSQ(nsqCfg)
}

// Setup is the seed's constructor. It never exits the process: if the
// configuration is unusable, the error is logged and the returned
// EntitySync's methods, and its Bridge's, return it (use New to handle the
// error yourself).
func Setup(config Config) *EntitySync {
	es, err := New(config)
	if err != nil {
		log := config.Logger
		if log == nil {
			log = logrus.StandardLogger()
		}
		log.WithError(err).Error("entitysync: setup failed")
		hub := esdb.NewDatabaseHub()
		return &EntitySync{Mux: config.Mux, DatabaseHub: hub, err: err,
			Bridge: esbridge.New(failedQueue{err}, hub, esbridge.Options{})}
	}
	return es
}

// failedQueue stands in for the queue a failed Setup could not build, so the
// seed's entitySync.Bridge.NotifyAllOfChange returns the setup error instead
// of dereferencing nil.
type failedQueue struct{ err error }

func (q failedQueue) Publish(context.Context, shared.EntityType, []byte) error { return q.err }
func (q failedQueue) Subscribe(shared.EntityType, func([]byte), func()) error {
	return q.err
}
func (q failedQueue) Close(context.Context) error { return nil }

// Err returns the error Setup met, if any.
func (e *EntitySync) Err() error { return e.err }

// Register makes the entity type available to clients: fetch returns a key's
// rows and is called once per change per server, for all subscribers. It
// returns once this server receives the type's notifications, or with the
// reason it cannot (an entity type the queue rejects, an unreachable broker).
func (e *EntitySync) Register(entity shared.EntityType, fetch esdb.FetchFunc) error {
	if e.err != nil {
		return e.err
	}
	if err := e.DatabaseHub.Register(entity, fetch); err != nil {
		return err
	}
	return e.serve(entity)
}

// RegisterCollection makes an entity type available to clients as a
// collection: fetch returns a key's rows (a list, a board, the rows of a
// user) and id names each row, usually esdb.JSONField("id"). Clients of the
// envelope protocol then receive, after the first full state, only the rows
// added, changed or removed, and nothing but "unchanged" when they resume
// holding the current state (see docs/protocol.md). Ids must be unique
// within a fetch; rows without a usable id are logged and named
// "#<index>". Like Register, it returns once this server receives the
// type's notifications.
func (e *EntitySync) RegisterCollection(entity shared.EntityType, fetch esdb.FetchFunc, id esdb.RowID) error {
	if e.err != nil {
		return e.err
	}
	if err := e.DatabaseHub.RegisterCollection(entity, fetch, id); err != nil {
		return err
	}
	return e.serve(entity)
}

// RegisterEntityAndDBHandler is the seed's way to register an entity type:
// handler writes the rows the holder of secret may see, one call of its
// ByteHandler per row. It is called once per distinct secret among a key's
// subscribers on each change; prefer Register when the rows do not depend on
// the secret.
func (e *EntitySync) RegisterEntityAndDBHandler(entity shared.EntityType, handler shared.SecretDBHandler) error {
	if e.err != nil {
		return e.err
	}
	if err := e.DatabaseHub.AddDataPullAndPushHandler(entity, handler); err != nil {
		return err
	}
	return e.serve(entity)
}

// serve subscribes the bridge to a registered entity type, and forgets the
// registration if that fails so the caller can fix the name and retry.
func (e *EntitySync) serve(entity shared.EntityType) error {
	if err := e.Bridge.ServeEntity(entity); err != nil {
		e.DatabaseHub.Unregister(entity)
		return err
	}
	e.served.Add(1)
	return nil
}

// NotifyAllOfChange is Bridge.NotifyAllOfChange.
func (e *EntitySync) NotifyAllOfChange(key shared.EntityKey) error {
	if e.err != nil {
		return e.err
	}
	return e.Bridge.NotifyAllOfChange(key)
}

// NotifyKeys is Bridge.NotifyKeys: after one write that changed several
// entities (a row and the lists it belongs to), notify all their keys at
// once, one queue message per entity type.
func (e *EntitySync) NotifyKeys(keys ...shared.EntityKey) error {
	if e.err != nil {
		return e.err
	}
	return e.Bridge.NotifyKeys(context.Background(), keys...)
}

// NotifyKeysAsync is Bridge.NotifyKeysAsync: NotifyKeys without waiting
// for the broker, as NotifyAsync.
func (e *EntitySync) NotifyKeysAsync(keys ...shared.EntityKey) error {
	if e.err != nil {
		return e.err
	}
	return e.Bridge.NotifyKeysAsync(keys...)
}

// NotifyAsync is Bridge.NotifyAsync: NotifyAllOfChange without waiting for
// the broker, for hot write paths (bounded, retried, failures reported).
func (e *EntitySync) NotifyAsync(key shared.EntityKey) error {
	if e.err != nil {
		return e.err
	}
	return e.Bridge.NotifyAsync(key)
}

// Close shuts down in order: the websocket endpoint (clients get close code
// 1001), then the bridge and its queue. It returns when their goroutines
// are gone, or with ctx's error.
func (e *EntitySync) Close(ctx context.Context) error {
	e.closing.Store(true)
	if e.err != nil {
		return e.Bridge.Close(ctx) // a failed Setup wired no transport
	}
	werr := e.Web.Close(ctx)
	berr := e.Bridge.Close(ctx)
	if err := errors.Join(werr, berr); err != nil {
		return fmt.Errorf("entitysync: close: %w", err)
	}
	return nil
}
