package entitysync_test

// These tests are written exactly in the seed's style (DESIGN.md, "The seed's
// API must keep working"), so the old API cannot rot unnoticed.

import (
	"encoding/json"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/mux"

	es "github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/esdb"
	"github.com/entity-sync/entity-sync/esq"
	"github.com/entity-sync/entity-sync/esweb"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/testkit"
	"github.com/entity-sync/entity-sync/shared"
)

type item struct {
	Entity string `json:"entity"`
	ID     string `json:"id"`
	V      int    `json:"v"`
}

func TestSeedSetupSnippet(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	nsqAddr := &[]string{nsqd.TCPAddr()}[0]
	var version atomic.Int64
	version.Store(1)
	fetch := func(key shared.EntityKey) item { return item{string(key.Entity), key.ID, int(version.Load())} }
	passed := make(chan string, 1)

	config := es.Config{Mux: mux.NewRouter(), NSQAddr: *nsqAddr, WSPassThrough: func(secret string, b []byte) { passed <- secret + "|" + string(b) }}
	entitySync := es.Setup(config)
	entitySync.RegisterEntityAndDBHandler("items", func(key shared.EntityKey, secret string, handler shared.ByteHandler) {
		b, _ := json.Marshal(fetch(key))
		handler(b) // may call handler several times: several rows
	})

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go http.Serve(l, config.Mux)
	t.Cleanup(func() { closeES(t, entitySync); l.Close() })

	ws := testkit.DialURL(t, "ws://"+l.Addr().String()+"/ws/entity-sync/")
	ws.Subscribe("items", "100")
	ws.Await(5*time.Second, "initial state", testkit.Is("items", "100", 1))

	version.Store(2) // written before the notify; the fetch runs after it
	entitySync.Bridge.NotifyAllOfChange(shared.EntityKey{Entity: "items", ID: "100"})
	ws.Await(5*time.Second, "change", testkit.Is("items", "100", 2))

	ws.SetSecret("s3cret")
	ws.SendRaw([]byte(`{"hello":"world"}`))
	select {
	case got := <-passed:
		if got != `s3cret|{"hello":"world"}` {
			t.Fatalf("pass-through got %q", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("pass-through not called")
	}
}

// The seed's "provide your own queue" wiring, with the seed's function types.
var BuildPublisher shared.AddressableEntityHandler = esq.BuildPublisher
var BuildSubscriber shared.AddressableEntityByteHandler = esq.BuildSubscriber

func TestSeedLowLevelWiring(t *testing.T) {
	nsqd := nsqtest.StartNSQD(t)
	queueAddr := nsqd.TCPAddr()
	store := testkit.NewStore()

	m := mux.NewRouter()
	databaseHub := esdb.NewDatabaseHub()
	databaseHub.AddDataPullAndPushHandler("items", store.SeedHandler)

	// The bridge matches communication from ws to nsq and from nsq to ws.
	bridge := esbridge.BuildBridge(
		BuildPublisher(queueAddr),
		BuildSubscriber(queueAddr),
		databaseHub.PullDataAndPush,
	)
	if err := bridge.ServeEntity("items"); err != nil {
		t.Fatal(err)
	}
	web := esweb.SetupMuxBridge(m, bridge.ClientBuilder, func(secret string, b []byte) {})

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go http.Serve(l, m)
	t.Cleanup(func() { l.Close() })

	ws := testkit.DialURL(t, "ws://"+l.Addr().String()+"/ws/entity-sync/")
	key := shared.EntityKey{Entity: "items", ID: "7"}
	ws.Subscribe("items", "7")
	ws.Await(5*time.Second, "initial state", testkit.Is("items", "7", 0))
	v := store.Bump(key)
	bridge.NotifyAllOfChange(key)
	ws.Await(5*time.Second, "change", testkit.Is("items", "7", v))
	_ = web
}
