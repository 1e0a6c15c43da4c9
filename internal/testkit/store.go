package testkit

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/shared"
)

// Store is an in-memory "database" of versioned entities. Its rows are JSON
// that name the key and version, so a test can tell what a frame is about.
type Store struct {
	mu       sync.Mutex
	versions map[shared.EntityKey]int
	// Parts is how many rows each fetch returns (default 1).
	Parts   int
	fetches atomic.Int64
	perKey  sync.Map // shared.EntityKey -> *atomic.Int64
}

// NewStore returns an empty store.
func NewStore() *Store { return &Store{versions: make(map[shared.EntityKey]int), Parts: 1} }

// Bump increments the key's version and returns it.
func (s *Store) Bump(key shared.EntityKey) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.versions[key]++
	return s.versions[key]
}

// Version returns the key's current version.
func (s *Store) Version(key shared.EntityKey) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.versions[key]
}

// Fetches returns how many fetches the store served in all.
func (s *Store) Fetches() int64 { return s.fetches.Load() }

// FetchesOf returns how many fetches of key the store served.
func (s *Store) FetchesOf(key shared.EntityKey) int64 {
	if c, ok := s.perKey.Load(key); ok {
		return c.(*atomic.Int64).Load()
	}
	return 0
}

func (s *Store) count(key shared.EntityKey) {
	s.fetches.Add(1)
	c, _ := s.perKey.LoadOrStore(key, new(atomic.Int64))
	c.(*atomic.Int64).Add(1)
}

// Rows renders the key's current state.
func (s *Store) Rows(key shared.EntityKey, secret string) [][]byte {
	s.count(key)
	v := s.Version(key)
	rows := make([][]byte, 0, s.Parts)
	for p := 0; p < s.Parts; p++ {
		b, _ := json.Marshal(Row{Entity: string(key.Entity), ID: key.ID, Version: v, Part: p, Secret: secret})
		rows = append(rows, b)
	}
	return rows
}

// Fetch is an esdb.FetchFunc over the store.
func (s *Store) Fetch(_ context.Context, key shared.EntityKey) ([][]byte, error) {
	return s.Rows(key, ""), nil
}

// SeedHandler is a shared.SecretDBHandler over the store: one handler call
// per row, the secret echoed in each row.
func (s *Store) SeedHandler(key shared.EntityKey, secret string, handler shared.ByteHandler) {
	for _, r := range s.Rows(key, secret) {
		handler(r)
	}
}

// Serve runs an EntitySync built from cfg behind an httptest server and
// closes both when the test ends.
func Serve(t testing.TB, cfg entitysync.Config) (*entitysync.EntitySync, *httptest.Server) {
	t.Helper()
	es, err := entitysync.New(cfg)
	if err != nil {
		t.Fatalf("entitysync.New: %v", err)
	}
	srv := httptest.NewServer(es.Mux)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := es.Close(ctx); err != nil {
			t.Errorf("close: %v", err)
		}
		srv.Close()
	})
	return es, srv
}
