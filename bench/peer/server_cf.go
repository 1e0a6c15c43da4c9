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
)

// runCF runs one Centrifuge node with its defaults: the memory broker, or
// the Redis broker at -redis-addr (under a key prefix unique to the run, so
// nothing else on that Redis is touched or heard). Every client that
// connects is subscribed to the entity's channel by the server (a
// server-side subscription granted in OnConnecting), so a client needs no
// Centrifuge library: it sends the JSON connect command and reads.
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

	level := centrifuge.LogLevelError
	if cfg.verbose {
		level = centrifuge.LogLevelInfo
	}
	node, err := centrifuge.New(centrifuge.Config{
		LogLevel: level,
		LogHandler: func(e centrifuge.LogEntry) {
			fmt.Fprintf(os.Stderr, "peer cf: %s %v\n", e.Message, e.Fields)
		},
	})
	if err != nil {
		return fail(err)
	}
	if cfg.redisAddr != "" {
		shard, err := centrifuge.NewRedisShard(node, centrifuge.RedisShardConfig{Address: cfg.redisAddr})
		if err != nil {
			return fail(fmt.Errorf("redis shard: %w", err))
		}
		broker, err := centrifuge.NewRedisBroker(node, centrifuge.RedisBrokerConfig{Prefix: cfg.prefix, Shards: []*centrifuge.RedisShard{shard}})
		if err != nil {
			return fail(fmt.Errorf("redis broker: %w", err))
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
		return fail(fmt.Errorf("run: %w", err))
	}
	notify := func(v int64) error {
		_, err := node.Publish(cfChannel, appendPayload(make([]byte, 0, 48), v))
		return err
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fail(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/connection/websocket", centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
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
	sayHello(hello{WS: "ws://" + l.Addr().String() + "/connection/websocket", Ctl: ctl})

	waitForParent()
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
