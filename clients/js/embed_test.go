package esjs_test

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"

	esjs "github.com/entity-sync/entity-sync/clients/js"
)

func TestHandlerServesTheModule(t *testing.T) {
	src, err := os.ReadFile("src/index.js")
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(esjs.Handler())
	defer srv.Close()

	res, err := http.Get(srv.URL + "/entity-sync.js")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusOK || !bytes.Equal(body, src) {
		t.Fatalf("status %d, %d bytes; want 200 and src/index.js (%d bytes)", res.StatusCode, len(body), len(src))
	}
	if ct := res.Header.Get("Content-Type"); ct != "text/javascript; charset=utf-8" {
		t.Fatalf("Content-Type %q", ct)
	}

	req, _ := http.NewRequest(http.MethodGet, srv.URL+"/entity-sync.js", nil)
	req.Header.Set("If-None-Match", res.Header.Get("ETag"))
	res2, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res2.Body.Close()
	if res2.StatusCode != http.StatusNotModified {
		t.Fatalf("revalidation: status %d, want 304", res2.StatusCode)
	}
}
