// Command client subscribes to one entity key on an entity-sync server and
// prints every frame the server pushes, one per line.
//
//	go run ./examples/basic/client                          # items/100 on the demo
//	go run ./examples/basic/client -id 100 -count 2         # exit after two frames
//	go run ./examples/basic/client -url ws://127.0.0.1:8081/ws/entity-sync/
//
// Ctrl-C closes the connection politely (close frame 1000) and exits 0.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

// subscribe is the seed protocol's request:
// {"action":"subscribe","body":{"entity":"items","id":"100"}}.
type subscribe struct {
	Action string `json:"action"`
	Body   struct {
		Entity string `json:"entity"`
		ID     string `json:"id"`
	} `json:"body"`
}

func main() {
	url := flag.String("url", "ws://127.0.0.1:8080/ws/entity-sync/", "entity-sync websocket endpoint")
	entity := flag.String("entity", "items", "entity type to subscribe to")
	id := flag.String("id", "100", "entity id to subscribe to")
	count := flag.Int("count", 0, "exit after this many frames (0 = run until Ctrl-C)")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("client: ")

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *url, *entity, *id, *count, os.Stdout); err != nil {
		log.Fatal(err)
	}
}

// run connects, subscribes and copies each text frame to out until count
// frames arrived, ctx ends or the server closes the connection.
func run(ctx context.Context, url, entity, id string, count int, out io.Writer) error {
	dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ws, _, err := websocket.DefaultDialer.DialContext(dialCtx, url, nil)
	if err != nil {
		return fmt.Errorf("connect to %s: %w", url, err)
	}
	defer ws.Close()

	var req subscribe
	req.Action = "subscribe"
	req.Body.Entity, req.Body.ID = entity, id
	if err := ws.WriteJSON(req); err != nil {
		return fmt.Errorf("subscribe: %w", err)
	}
	log.Printf("subscribed to %s/%s on %s", entity, id, url)

	// ReadMessage blocks, so read on a goroutine and let the main loop wait
	// for either a frame or Ctrl-C.
	type frame struct {
		kind int
		data []byte
		err  error
	}
	frames := make(chan frame)
	done := make(chan struct{})
	defer close(done) // runs before ws.Close: the reader then exits on its read error
	go func() {
		for {
			kind, data, err := ws.ReadMessage()
			select {
			case frames <- frame{kind, data, err}:
			case <-done:
				return
			}
			if err != nil {
				return
			}
		}
	}()

	for n := 0; count == 0 || n < count; {
		select {
		case <-ctx.Done():
			return closePolitely(ws)
		case f := <-frames:
			if f.err != nil {
				if websocket.IsCloseError(f.err, websocket.CloseNormalClosure, websocket.CloseGoingAway) {
					log.Printf("server closed the connection: %v", f.err)
					return nil
				}
				return fmt.Errorf("read: %w", f.err)
			}
			if f.kind != websocket.TextMessage {
				continue // the protocol only pushes text; ignore anything else
			}
			if _, err := fmt.Fprintf(out, "%s\n", f.data); err != nil {
				return err
			}
			n++
		}
	}
	return closePolitely(ws)
}

// closePolitely sends a normal-closure frame so the server logs a clean
// goodbye rather than a broken connection. The deferred Close then drops the
// TCP connection without waiting for the server's reply.
func closePolitely(ws *websocket.Conn) error {
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "bye")
	err := ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
	if err != nil && !errors.Is(err, websocket.ErrCloseSent) {
		return fmt.Errorf("close: %w", err)
	}
	return nil
}
