package entitysync_test

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// Each broker's client library is imported only by its own esq/ package,
// the Prometheus client only by esmetrics, and SQLite only by the todo demo:
// an application that uses NSQ or the in-process queue, without metrics,
// builds no NATS, Redis or Prometheus client, and no SQLite.
func TestEntitysyncImportsNoBrokerClient(t *testing.T) {
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	out, err := exec.Command(goBin, "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		for _, banned := range []string{"nats-io", "go-redis", "/natsq", "/redisq", "/esqtest", "prometheus", "/esmetrics", "sqlite"} {
			if strings.Contains(pkg, banned) {
				t.Errorf("package entitysync depends on %s", pkg)
			}
		}
	}
}
