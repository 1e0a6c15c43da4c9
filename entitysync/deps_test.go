package entitysync_test

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// Each broker's client library is imported only by its own esq/ package:
// an application that uses NSQ or the in-process queue does not build NATS
// or Redis clients.
func TestEntitysyncImportsNoBrokerClient(t *testing.T) {
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	out, err := exec.Command(goBin, "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		for _, banned := range []string{"nats-io", "go-redis", "/natsq", "/redisq", "/esqtest"} {
			if strings.Contains(pkg, banned) {
				t.Errorf("package entitysync depends on %s", pkg)
			}
		}
	}
}
