package main

import (
	_ "embed"
	"net/http"

	"github.com/gorilla/mux"

	esjs "github.com/entity-sync/entity-sync/clients/js"
)

// indexHTML is the demo page: it loads the JavaScript client and shows item
// 100 changing live.
//
//go:embed index.html
var indexHTML []byte

// addPage serves the demo page at / and the JavaScript client it imports at
// /entity-sync.js. The client is clients/js/src/index.js, embedded by the
// package esjs that lives beside it (go:embed cannot reach outside this
// directory, and a copy here could drift from the real client).
func addPage(r *mux.Router) {
	r.Handle("/entity-sync.js", esjs.Handler()).Methods(http.MethodGet, http.MethodHead)
	r.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-cache")
		_, _ = w.Write(indexHTML)
	}).Methods(http.MethodGet, http.MethodHead)
}
