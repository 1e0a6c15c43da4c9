package main

import (
	"io"
	"net/http"
	"strings"
	"testing"
)

// get returns the status and body of an HTTP GET to the demo.
func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

// The operator's endpoints: probes that answer, and metrics that count the
// demo's own client and changes beside the Go runtime's.
func TestDemoServesMetricsAndProbes(t *testing.T) {
	d := startDemo(t, config{Every: tick})
	base := "http://" + d.addr
	if code, body := get(t, base+livenessPath); code != http.StatusOK || strings.TrimSpace(body) != "ok" {
		t.Errorf("%s: %d %q, want 200 ok", livenessPath, code, body)
	}
	if code, body := get(t, base+readinessPath); code != http.StatusOK || strings.TrimSpace(body) != "ready" {
		t.Errorf("%s: %d %q, want 200 ready", readinessPath, code, body)
	}
	ws := subscribe(t, d.addr, "100")
	awaitNewer(t, ws, nextItem(t, ws))
	code, body := get(t, base+metricsPath)
	if code != http.StatusOK {
		t.Fatalf("%s: %d", metricsPath, code)
	}
	for _, want := range []string{"\nentitysync_connections 1\n", "\nentitysync_subscriptions 1\n", "\nentitysync_ready 1\n",
		"\nentitysync_notification_latency_seconds_count ", "\ngo_goroutines ", "\nprocess_open_fds "} {
		if !strings.Contains(body, want) {
			t.Errorf("%s lacks %q", metricsPath, strings.TrimSpace(want))
		}
	}
}
