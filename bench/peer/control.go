//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Every process but the orchestrator answers control requests over HTTP on
// its own 127.0.0.1 listener, apart from the listener under test, so the
// control traffic never shares a mux or a port with the system measured.

// serveControl starts an HTTP server for mux on a new 127.0.0.1 port and
// returns its base URL.
func serveControl(mux *http.ServeMux) (string, func(), error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }()
	return "http://" + l.Addr().String(), func() { _ = srv.Close() }, nil
}

// writeJSON answers a control request with v, or with the error as JSON
// and status 500.
func writeJSON(w http.ResponseWriter, v any, err error) {
	if err != nil {
		w.WriteHeader(http.StatusInternalServerError)
		v = map[string]string{"error": err.Error()}
	}
	b, merr := json.Marshal(v)
	if merr != nil {
		w.WriteHeader(http.StatusInternalServerError)
		b = []byte(`{"error":` + strconv.Quote(merr.Error()) + `}`)
	}
	_, _ = w.Write(append(b, '\n'))
}

func intParam(r *http.Request, name string, def int) int {
	if v, err := strconv.Atoi(r.URL.Query().Get(name)); err == nil {
		return v
	}
	return def
}

func floatParam(r *http.Request, name string, def float64) float64 {
	if v, err := strconv.ParseFloat(r.URL.Query().Get(name), 64); err == nil {
		return v
	}
	return def
}

// timeoutParam is the handler's own deadline: the caller sends a little
// less than its HTTP timeout so the answer (even a partial one) arrives.
func timeoutParam(r *http.Request, def time.Duration) time.Duration {
	if ms, err := strconv.Atoi(r.URL.Query().Get("timeout_ms")); err == nil && ms > 0 {
		return time.Duration(ms) * time.Millisecond
	}
	return def
}

// call POSTs body (JSON, may be nil) to base+path?query and decodes the
// JSON answer into out, giving up after timeout or when ctx ends.
func call(ctx context.Context, timeout time.Duration, base, path string, query url.Values, body, out any) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if query == nil {
		query = url.Values{}
	}
	query.Set("timeout_ms", fmt.Sprint((timeout - 2*time.Second).Milliseconds()))
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+path+"?"+query.Encode(), rd)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s: %s", path, resp.Status, strings.TrimSpace(string(b)))
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}
