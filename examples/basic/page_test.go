package main

import (
	"bytes"
	"io"
	"net/http"
	"strings"
	"testing"

	esjs "github.com/entity-sync/entity-sync/clients/js"
)

// TestPageAndClientModule: the demo serves its page at / and, at the path
// the page imports, the JavaScript client.
func TestPageAndClientModule(t *testing.T) {
	d := startDemo(t, config{Every: tick})
	get := func(path string) (*http.Response, []byte) {
		t.Helper()
		res, err := http.Get("http://" + d.addr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, err := io.ReadAll(res.Body)
		if err != nil {
			t.Fatal(err)
		}
		if res.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: status %d", path, res.StatusCode)
		}
		return res, b
	}

	res, page := get("/")
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
		t.Fatalf("page Content-Type %q", ct)
	}
	if !bytes.Contains(page, []byte(`from '/entity-sync.js'`)) {
		t.Fatal("the page does not import /entity-sync.js")
	}
	res, module := get("/entity-sync.js")
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/javascript") {
		t.Fatalf("module Content-Type %q", ct)
	}
	if !bytes.Equal(module, esjs.Module) {
		t.Fatal("/entity-sync.js is not the client module")
	}
}
