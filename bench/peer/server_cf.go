//go:build linux

package main

import (
	"context"
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
// server-side subscription granted in OnConnecting), so a client needs no
// Centrifuge library: it sends the JSON connect command and reads. The
// returned handler serves the node's websocket endpoint; notify publishes
// the row at a version.
func newCFNode(redisAddr, prefix string, verbose bool) (*centrifuge.Node, http.Handler, notifyFunc, error) {
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
		return nil, nil, nil, err
	}
	if redisAddr != "" {
		shard, err := centrifuge.NewRedisShard(node, centrifuge.RedisShardConfig{Address: redisAddr})
		if err != nil {
			return nil, nil, nil, fmt.Errorf("redis shard: %w", err)
		}
		broker, err := centrifuge.NewRedisBroker(node, centrifuge.RedisBrokerConfig{Prefix: prefix, Shards: []*centrifuge.RedisShard{shard}})
		if err != nil {
			return nil, nil, nil, fmt.Errorf("redis broker: %w", err)
		}
		node.SetBroker(broker) // also the controller: nodes find each other through Redis
	}
	// Anonymous clients, each subscribed to the one channel on connect.
	node.OnConnecting(func(context.Context, centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
		return centrifuge.ConnectReply{
			Credentials:   &centrifuge.Credentials{UserID: ""},
			Subscriptions: map[string]centrifuge.SubscribeOptions{cfChannel: {}},
		}, nil
	})
	if err := node.Run(); err != nil {
		return nil, nil, nil, fmt.Errorf("run: %w", err)
	}
	notify := func(v int64) error {
		_, err := node.Publish(cfChannel, appendPayload(make([]byte, 0, 48), v))
		return err
	}
	mux := http.NewServeMux()
	mux.Handle(cfPath, centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{}))
	return node, mux, notify, nil
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
	node, handler, notify, err := newCFNode(cfg.redisAddr, cfg.prefix, cfg.verbose)
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
	ctl, stopCtl, err := serveControl(serverControl(cell, notify))
	if err != nil {
		return fail(err)
	}
	defer stopCtl()
	sayHello(hello{WS: "ws://" + l.Addr().String() + cfPath, Ctl: ctl})

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
