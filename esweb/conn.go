package esweb

import (
	"encoding/json"
	"errors"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esbridge"
	"github.com/entity-sync/entity-sync/shared"
)

// conn is one websocket connection: readPump owns reads, writePump owns
// writes (gorilla/websocket allows one of each at a time).
type conn struct {
	s      *Server
	ws     *websocket.Conn
	client *esbridge.Client
	log    logrus.FieldLogger

	shutdown chan struct{} // closed by Server.Close: say 1001 and go
	readDone chan struct{} // closed when readPump returns
}

func (c *conn) readPump() {
	defer func() {
		close(c.readDone)
		c.client.Close()
		c.s.wg.Done()
	}()
	pongWait := c.s.opts.PongWait
	c.ws.SetReadLimit(c.s.opts.ReadLimit)
	_ = c.ws.SetReadDeadline(time.Now().Add(pongWait))
	c.ws.SetPongHandler(func(string) error { return c.ws.SetReadDeadline(time.Now().Add(pongWait)) })
	for {
		_, data, err := c.ws.ReadMessage()
		if err != nil {
			switch {
			case errors.Is(err, websocket.ErrReadLimit):
				c.log.Warnf("closing connection: frame larger than the %d byte limit", c.s.opts.ReadLimit)
			case websocket.IsCloseError(err, websocket.CloseNormalClosure, websocket.CloseGoingAway, websocket.CloseNoStatusReceived):
			default:
				c.log.WithError(err).Debug("connection read ended")
			}
			return
		}
		_ = c.ws.SetReadDeadline(time.Now().Add(pongWait))
		c.handle(data)
	}
}

// handle applies one client frame. Bad frames are logged and ignored: the
// raw protocol has no error frame, and one bad request must not cost the
// connection its other subscriptions.
func (c *conn) handle(data []byte) {
	var m shared.Message
	if err := json.Unmarshal(data, &m); err != nil {
		c.log.WithError(err).Warnf("ignoring frame that is not a JSON request: %.100q", data)
		return
	}
	switch m.Action {
	case shared.ActionSubscribe, shared.ActionUnsubscribe:
		var key shared.EntityKey
		if err := json.Unmarshal(m.Body, &key); err != nil {
			c.log.WithError(err).Warnf("ignoring %s: body must be {\"entity\":\"...\",\"id\":\"...\"}", m.Action)
			return
		}
		if err := key.Validate(); err != nil {
			c.log.WithError(err).Warnf("ignoring %s", m.Action)
			return
		}
		if m.Action == shared.ActionUnsubscribe {
			c.client.Unsubscribe(key)
			return
		}
		if err := c.client.Subscribe(key); err != nil {
			c.log.WithError(err).WithField("key", key.String()).Warn("subscribe refused")
		}
	case shared.ActionSecret:
		var secret string
		if err := json.Unmarshal(m.Body, &secret); err != nil {
			c.log.Warn("ignoring secret: body must be a JSON string")
			return
		}
		c.client.SetSecret(secret)
	case "":
		c.passThrough(data)
	default:
		c.log.Warnf("ignoring unknown action %.50q", m.Action)
	}
}

func (c *conn) passThrough(data []byte) {
	pt := c.s.opts.PassThrough
	if pt == nil {
		c.log.Debug("dropping frame without action: no pass-through function configured")
		return
	}
	defer func() {
		if r := recover(); r != nil {
			c.log.Errorf("pass-through function panicked: %v", r)
		}
	}()
	pt(c.client.Secret(), data)
}

func (c *conn) writePump() {
	ticker := time.NewTicker(c.s.opts.PongWait * 9 / 10)
	defer func() {
		ticker.Stop()
		c.ws.Close() // ends readPump's ReadMessage
		c.s.forget(c)
		c.s.wg.Done()
	}()
	var batch []*esbridge.Update
	for {
		select {
		case <-c.client.Ready():
			batch = c.client.Take(batch[:0])
			for _, u := range batch {
				if err := c.writeUpdate(u); err != nil {
					c.log.WithError(err).Info("dropping connection: write failed or timed out")
					return
				}
			}
			clear(batch) // let written updates be collected
		case <-ticker.C:
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(c.s.opts.WriteWait)); err != nil {
				c.log.WithError(err).Debug("dropping connection: ping failed")
				return
			}
		case <-c.readDone:
			return
		case <-c.shutdown:
			msg := websocket.FormatCloseMessage(websocket.CloseGoingAway, errShutdown.Error())
			_ = c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(c.s.opts.WriteWait))
			// Give the client a moment to answer the close handshake.
			select {
			case <-c.readDone:
			case <-time.After(time.Second):
			}
			return
		}
	}
}

// rawFrames is the Memo id of an update's frames in the seed's protocol: one
// text frame per row, prepared once for all connections.
type rawFramesID struct{}

func (c *conn) writeUpdate(u *esbridge.Update) error {
	frames := u.Memo(rawFramesID{}, prepareRaw).([]*websocket.PreparedMessage)
	for _, f := range frames {
		_ = c.ws.SetWriteDeadline(time.Now().Add(c.s.opts.WriteWait))
		if err := c.ws.WritePreparedMessage(f); err != nil {
			return err
		}
	}
	return nil
}

func prepareRaw(u *esbridge.Update) any {
	frames := make([]*websocket.PreparedMessage, 0, len(u.Rows))
	for _, row := range u.Rows {
		pm, err := websocket.NewPreparedMessage(websocket.TextMessage, row)
		if err != nil { // only compression can fail, and it is off
			logrus.WithError(err).WithField("key", u.Key.String()).Error("esweb: cannot prepare frame")
			continue
		}
		frames = append(frames, pm)
	}
	return frames
}
