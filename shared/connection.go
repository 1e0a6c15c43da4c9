package shared

import (
	"context"
	"net/http"
)

// Connection describes one client connection to the application's hooks
// (authorize, row filter, pass-through). Find it in their context with
// ConnectionFrom.
type Connection struct {
	// ID identifies the connection within this server process.
	ID string
	// Request is the HTTP request that was upgraded: method, URL, headers
	// (cookies), host, remote address, TLS state. Its body and its context
	// are not kept: pass what middleware put in the context through the
	// transport's authenticate hook, whose result is Principal.
	Request *http.Request
	// Principal is what the application's authenticate hook returned for
	// the request (nil without such a hook).
	Principal any

	secret func() string
}

// NewConnection describes a connection; secret reports the secret the client
// has currently set.
func NewConnection(id string, r *http.Request, principal any, secret func() string) *Connection {
	return &Connection{ID: id, Request: r, Principal: principal, secret: secret}
}

// Secret returns the secret the client has currently set with the "secret"
// action, or "".
func (c *Connection) Secret() string {
	if c == nil || c.secret == nil {
		return ""
	}
	return c.secret()
}

type connectionKey struct{}

// WithConnection returns a context carrying conn.
func WithConnection(ctx context.Context, conn *Connection) context.Context {
	return context.WithValue(ctx, connectionKey{}, conn)
}

// ConnectionFrom returns the connection a hook's context carries, if any.
func ConnectionFrom(ctx context.Context) (*Connection, bool) {
	c, ok := ctx.Value(connectionKey{}).(*Connection)
	return c, ok
}
