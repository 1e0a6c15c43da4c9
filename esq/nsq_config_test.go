package esq_test

import (
	"strings"
	"testing"
	"time"

	"github.com/entity-sync/entity-sync/esq"
)

// TestNSQConfigIsValidatedOnce: a nonsensical setting is refused by NewNSQ
// with an error naming the field, instead of failing later (a negative
// WatchInterval used to panic in the watcher goroutine of the first
// Subscribe).
func TestNSQConfigIsValidatedOnce(t *testing.T) {
	addrs := []string{"127.0.0.1:4150"}
	for _, tc := range []struct {
		name  string
		cfg   esq.NSQConfig
		field string
	}{
		{"negative WatchInterval", esq.NSQConfig{NSQDAddrs: addrs, WatchInterval: -time.Second}, "WatchInterval"},
		{"negative WatchInterval with a negative ReconnectInterval", esq.NSQConfig{NSQDAddrs: addrs, WatchInterval: -time.Second, ReconnectInterval: -time.Second}, "must not be negative"},
		{"negative ReconnectInterval", esq.NSQConfig{NSQDAddrs: addrs, ReconnectInterval: -time.Second}, "ReconnectInterval"},
		{"negative LiveTimeout", esq.NSQConfig{NSQDAddrs: addrs, LiveTimeout: -time.Second}, "LiveTimeout"},
		{"negative MaxInFlight", esq.NSQConfig{NSQDAddrs: addrs, MaxInFlight: -1}, "MaxInFlight"},
		{"no nsqd", esq.NSQConfig{}, "NSQDAddrs"},
		{"empty nsqd address", esq.NSQConfig{NSQDAddrs: []string{""}}, "NSQDAddrs"},
		{"ReconnectInterval too long", esq.NSQConfig{NSQDAddrs: addrs, ReconnectInterval: time.Hour}, "ReconnectInterval"},
		{"ReconnectInterval below twice WatchInterval", esq.NSQConfig{NSQDAddrs: addrs, ReconnectInterval: time.Second, WatchInterval: time.Second}, "ReconnectInterval"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q, err := esq.NewNSQ(tc.cfg)
			if err == nil {
				t.Fatalf("NewNSQ accepted %+v", tc.cfg)
			}
			if q != nil {
				t.Fatal("NewNSQ returned a queue with its error")
			}
			if !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("error %q does not name %s", err, tc.field)
			}
		})
	}
}
