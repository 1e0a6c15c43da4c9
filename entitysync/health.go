package entitysync

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/entity-sync/entity-sync/esq"
)

// Ready returns nil when this server can take clients and keep them in
// sync, or an error saying why not: Setup failed, Close was called, no
// entity type is registered yet (a client would be refused with
// unknown_entity, and per the protocol does not retry), or the queue's
// subscriptions are not live (the broker connection is lost: this server
// would not hear changes made through the others). Queues that cannot tell
// their state (see esq.LiveReporter) are taken to be live. Ready is cheap:
// a load balancer may ask it every second.
func (e *EntitySync) Ready() error {
	switch {
	case e.err != nil:
		return fmt.Errorf("setup failed: %w", e.err)
	case e.closing.Load():
		return errors.New("shutting down")
	case e.served.Load() == 0:
		return errors.New("no entity type registered yet")
	}
	if err := esq.CheckLive(e.queue); err != nil {
		return fmt.Errorf("queue not live: %w", err)
	}
	return nil
}

// ReadinessHandler answers a load balancer's readiness probe: 200 and
// "ready" while Ready returns nil, else 503 and "not ready: " with Ready's
// reason, as text. Serve it on a path of your choice (examples/basic uses
// /readyz); a server that is not ready should get no new clients, while
// the ones it has stay connected and converge once it is ready again.
func (e *EntitySync) ReadinessHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if err := e.Ready(); err != nil {
			probeAnswer(w, http.StatusServiceUnavailable, "not ready: "+err.Error())
			return
		}
		probeAnswer(w, http.StatusOK, "ready")
	})
}

// LivenessHandler answers a liveness probe: 200 and "ok" while the process
// serves HTTP, also while it is not ready or shutting down (restarting a
// server because its broker is away would not bring the broker back). Only
// a failed Setup, which no amount of waiting fixes, answers 503, so an
// orchestrator restarts the process and shows the crash loop. Serve it on a
// path of your choice (examples/basic uses /healthz).
func (e *EntitySync) LivenessHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if e.err != nil {
			probeAnswer(w, http.StatusServiceUnavailable, "setup failed: "+e.err.Error())
			return
		}
		probeAnswer(w, http.StatusOK, "ok")
	})
}

func probeAnswer(w http.ResponseWriter, status int, body string) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = fmt.Fprintln(w, body)
}
