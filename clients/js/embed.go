// Package esjs hands the JavaScript client to browsers from Go: it embeds
// the module src/index.js of this directory (the one published as
// @entity-sync/client), so a Go server can serve the exact client of its
// library version with no copy and no build step:
//
//	import esjs "github.com/entity-sync/entity-sync/clients/js"
//
//	router.Handle("/entity-sync.js", esjs.Handler())
//
// and in the page: import { connect } from '/entity-sync.js'.
package esjs

import (
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"net/http"
	"time"
)

// Module is the client's ES module source (src/index.js).
//
//go:embed src/index.js
var Module []byte

// Types is the module's TypeScript declarations (src/index.d.ts).
//
//go:embed src/index.d.ts
var Types []byte

// etag identifies this build's module, so browsers revalidate cheaply.
var etag = func() string {
	sum := sha256.Sum256(Module)
	return `"` + hex.EncodeToString(sum[:8]) + `"`
}()

// Handler serves Module as JavaScript at whatever path it is mounted on,
// with an ETag; browsers revalidate it on each load (Cache-Control:
// no-cache), so a new server version is picked up at once.
func Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("ETag", etag)
		w.Header().Set("Cache-Control", "no-cache")
		w.Header().Set("Content-Type", "text/javascript; charset=utf-8")
		http.ServeContent(w, r, "entity-sync.js", time.Time{}, bytes.NewReader(Module))
	})
}
