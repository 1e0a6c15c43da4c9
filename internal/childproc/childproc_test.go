//go:build linux

package childproc

import (
	"encoding/json"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain lets the test binary play the child roles Spawn starts: Spawn
// runs os.Executable(), which here is this test binary.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && strings.HasPrefix(os.Args[1], "-role=") {
		os.Exit(playRole(strings.TrimPrefix(os.Args[1], "-role="), os.Args[2:]))
	}
	os.Exit(m.Run())
}

type testHello struct {
	Args []string `json:"args"`
	Err  string   `json:"err,omitempty"`
}

func playRole(role string, args []string) int {
	say := func(h testHello) { _ = json.NewEncoder(os.Stdout).Encode(h) }
	switch role {
	case "echo": // says hello with its arguments, exits when stdin closes
		say(testHello{Args: args})
		WaitForParent(time.Minute)
		return 0
	case "refuse": // says why it cannot start
		say(testHello{Err: "no broker"})
		WaitForParent(time.Minute)
		return 0
	case "vanish": // exits without a word
		return 0
	case "mute": // never says hello
		WaitForParent(time.Minute)
		return 0
	case "stubborn": // says hello, then ignores stdin closing
		say(testHello{})
		time.Sleep(time.Minute)
		return 0
	}
	return 2
}

func TestSpawnDecodesHelloAndStops(t *testing.T) {
	var h testHello
	c, err := Spawn("echo", 10*time.Second, &h, "-a", "b c")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(h.Args, "|"); got != "-a|b c" {
		t.Errorf("child got args %q, want -a|b c", got)
	}
	if err := c.Stop(); err != nil {
		t.Errorf("Stop: %v (the child should exit 0 once stdin closes)", err)
	}
}

func TestSpawnFailures(t *testing.T) {
	for _, tc := range []struct {
		role, want string
		timeout    time.Duration
	}{
		{"refuse", "refuse process: no broker", 10 * time.Second},
		{"vanish", "exited before saying hello", 10 * time.Second},
		{"mute", "did not say hello within", 300 * time.Millisecond},
	} {
		t.Run(tc.role, func(t *testing.T) {
			var h testHello
			c, err := Spawn(tc.role, tc.timeout, &h)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Spawn(%s) error %v, want one containing %q", tc.role, err, tc.want)
			}
			if c != nil {
				t.Errorf("Spawn(%s) returned a child along with its error", tc.role)
			}
		})
	}
}

func TestStopKillsAChildThatIgnoresStdin(t *testing.T) {
	var h testHello
	c, err := Spawn("stubborn", 10*time.Second, &h)
	if err != nil {
		t.Fatal(err)
	}
	c.Grace = 200 * time.Millisecond
	start := time.Now()
	err = c.Stop()
	if err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("Stop error %v, want one saying the child was killed", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Stop took %s with a 200ms grace", d)
	}
	var nilChild *Child
	if err := nilChild.Stop(); err != nil {
		t.Errorf("Stop on a nil Child: %v", err)
	}
}

func TestRaiseNOFILE(t *testing.T) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	orig := lim
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig) })
	if lim.Max <= 64 {
		t.Skipf("hard limit %d leaves no room to lower the soft limit", lim.Max)
	}
	// The Go runtime already raises the soft limit at start, so lower it
	// first: otherwise a RaiseNOFILE that did nothing would pass.
	lim.Cur = 64
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if err := RaiseNOFILE(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur != orig.Max {
		t.Errorf("soft limit %d after RaiseNOFILE, want the hard limit %d", lim.Cur, orig.Max)
	}
}

func TestCPUNanosCountsThisProcessWork(t *testing.T) {
	before := CPUNanos()
	if before < 0 {
		t.Fatal("CPUNanos could not read rusage")
	}
	// Spin until 20ms of CPU time shows; a CPUNanos that does not move
	// fails at the deadline.
	deadline := time.Now().Add(5 * time.Second)
	x := uint64(1)
	for CPUNanos()-before < 20e6 {
		if time.Now().After(deadline) {
			t.Fatalf("CPUNanos moved %d ns in 5s of spinning", CPUNanos()-before)
		}
		for i := 0; i < 1e5; i++ {
			x = x*6364136223846793005 + 1
		}
	}
	if x == 0 {
		t.Log(x) // keeps the loop from being optimised away
	}
}
