//go:build linux

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/centrifugal/centrifuge"

	"github.com/entity-sync/entity-sync/internal/childproc"
)

// cfPath is where the Centrifuge node's websocket handler is mounted.
const cfPath = "/connection/websocket"

// newCFNode builds and runs a Centrifuge node with its defaults: the memory
// broker, or the Redis broker at redisAddr (under prefix, unique to the
// run, so nothing else on that Redis is touched or heard). Every client
// that connects is subscribed to the entity's channel by the server (a
// server-side subscription granted in OnConnecting) to the channels of the
// entity ids its connect command lists in its data ({"keys":[1,2]}), so a
// client needs no Centrifuge library: it sends the JSON connect command and
// reads. The returned handler serves the node's websocket endpoint and the
// app's write endpoint (changeHandler, which publishes the row at its new
// version).
func newCFNode(redisAddr, prefix string, verbose bool, cell *versionCell) (*centrifuge.Node, http.Handler, error) {
	level := centrifuge.LogLevelError
	if verbose {
		level = centrifuge.LogLevelInfo
	}
	node, err := centrifuge.New(centrifuge.Config{
		LogLevel: level,
		LogHandler: func(e centrifuge.LogEntry) {
			fmt.Fprintf(os.Stderr, "peer cf: %s %v\n", e.Message, e.Fields)
		},
	})
	if err != nil {
		return nil, nil, err
	}
	if redisAddr != "" {
		shard, err := centrifuge.NewRedisShard(node, centrifuge.RedisShardConfig{Address: redisAddr})
		if err != nil {
			return nil, nil, fmt.Errorf("redis shard: %w", err)
		}
		broker, err := centrifuge.NewRedisBroker(node, centrifuge.RedisBrokerConfig{Prefix: prefix, Shards: []*centrifuge.RedisShard{shard}})
		if err != nil {
			return nil, nil, fmt.Errorf("redis broker: %w", err)
		}
		node.SetBroker(broker) // also the controller: nodes find each other through Redis
	}
	// Anonymous clients, each subscribed on connect to the channels it
	// asked for.
	node.OnConnecting(func(_ context.Context, e centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
		var data struct {
			Keys []int `json:"keys"`
		}
		if err := json.Unmarshal(e.Data, &data); err != nil {
			return centrifuge.ConnectReply{}, centrifuge.ErrorBadRequest
		}
		subs := make(map[string]centrifuge.SubscribeOptions, len(data.Keys))
		for _, id := range data.Keys {
			subs[cfChannel(id)] = centrifuge.SubscribeOptions{}
		}
		return centrifuge.ConnectReply{Credentials: &centrifuge.Credentials{UserID: ""}, Subscriptions: subs}, nil
	})
	if err := node.Run(); err != nil {
		return nil, nil, fmt.Errorf("run: %w", err)
	}
	notify := func(id int, v int64) error {
		_, err := node.Publish(cfChannel(id), appendPayload(make([]byte, 0, 48), id, v))
		return err
	}
	mux := http.NewServeMux()
	mux.Handle(cfPath, centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{}))
	mux.Handle("POST "+changePath, changeHandler(cell, notify))
	return node, mux, nil
}

// runCF runs one Centrifuge node (newCFNode) on its own listener, with the
// control endpoints on another, until the orchestrator lets go.
func runCF(cfg config) int {
	fail := func(err error) int {
		sayHello(hello{Err: "cf: " + err.Error()})
		return 1
	}
	cell, err := openCell(cfg.cell)
	if err != nil {
		return fail(err)
	}
	defer cell.close()
	node, handler, err := newCFNode(cfg.redisAddr, cfg.prefix, cfg.verbose, cell)
	if err != nil {
		return fail(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fail(err)
	}
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fmt.Fprintf(os.Stderr, "peer cf: serve: %v\n", err)
		}
	}()
	ctl, stopCtl, err := serveControl(serverControl(nil))
	if err != nil {
		return fail(err)
	}
	defer stopCtl()
	sayHello(hello{WS: "ws://" + l.Addr().String() + cfPath, App: "http://" + l.Addr().String(), Ctl: ctl})

	childproc.WaitForParent(childLifetime)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	code := 0
	if err := node.Shutdown(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "peer cf: shutdown: %v\n", err)
		code = 1
	}
	_ = srv.Close()
	return code
}
