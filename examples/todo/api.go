package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/gorilla/mux"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/entitysync"
	"github.com/entity-sync/entity-sync/shared"
)

// The HTTP API the page writes through. Every answer is JSON; an error is
// {"error":"message"} with a 4xx status for bad input, so the page can show
// the message as it is.
//
//	GET    /api/lists                      the newest lists
//	POST   /api/lists            {title}   create a list
//	GET    /api/lists/{id}                 one list (404 if unknown)
//	POST   /api/lists/{id}/items {title, key?}   add an item
//	       (key: any string of up to 100 bytes the client makes unique, e.g.
//	       random; an add whose key the list already holds saves nothing
//	       and answers, as a success, with the item that key added)
//	PATCH  /api/lists/{id}/items/{item} {title?, done?, version?}   edit or tick an item
//	       (with version: only if the item is still at that version, else 409
//	       with {"error", "item"}: the item as someone else left it)
//	DELETE /api/lists/{id}/items/{item}    delete an item
//
// Reads of a list's items go through entity-sync, not this API: the page
// subscribes to the key {"entity":"list","id":ID} and gets the items on
// every change; the home page subscribes to {"entity":"lists","id":"recent"},
// the newest lists.

const (
	// maxTitle is the longest title, in characters. The server is the one
	// place that enforces it, so every client gets the same message.
	maxTitle = 200
	// maxBody bounds a request body; anything larger is refused unread.
	maxBody = 16 << 10
	// maxAddKey bounds an add's key, in bytes: room for any random id a
	// client may make, and no room to store anything else in it.
	maxAddKey = 100
)

// api serves the HTTP API over the store and tells entity-sync about writes.
type api struct {
	db  *store
	es  *entitysync.EntitySync
	log logrus.FieldLogger
}

func (a *api) routes(r *mux.Router) {
	r.HandleFunc("/api/lists", a.getLists).Methods(http.MethodGet)
	r.HandleFunc("/api/lists", a.createList).Methods(http.MethodPost)
	r.HandleFunc("/api/lists/{list}", a.getList).Methods(http.MethodGet)
	r.HandleFunc("/api/lists/{list}/items", a.addItem).Methods(http.MethodPost)
	r.HandleFunc("/api/lists/{list}/items/{item}", a.updateItem).Methods(http.MethodPatch)
	r.HandleFunc("/api/lists/{list}/items/{item}", a.deleteItem).Methods(http.MethodDelete)
	r.NotFoundHandler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "nothing at %s", r.URL.Path)
	})
	r.MethodNotAllowedHandler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusMethodNotAllowed, "%s is not allowed on %s", r.Method, r.URL.Path)
	})
}

func (a *api) getLists(w http.ResponseWriter, r *http.Request) {
	ls, err := a.db.lists(r.Context())
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, ls)
}

func (a *api) createList(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Title string `json:"title"`
	}
	if !readJSON(w, r, &req) || !validTitle(w, &req.Title) {
		return
	}
	l, err := a.db.createList(writeContext(r), req.Title)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	a.changed(w, shared.EntityKey{Entity: entityLists, ID: listsRecent}, http.StatusCreated, l)
}

func (a *api) getList(w http.ResponseWriter, r *http.Request) {
	l, err := a.db.list(r.Context(), mux.Vars(r)["list"])
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, l)
}

// addItem adds an item. A page sends an add again when it got no answer,
// which does not mean the first attempt was not saved: each add carries a
// key, the same on every attempt, and an attempt whose key was saved
// already gets the item saved then, so the item is added once. It is
// answered as the first was (201), and notified again: the first attempt's
// notification may be the part that failed (503 below).
func (a *api) addItem(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Title string `json:"title"`
		Key   string `json:"key"`
	}
	if !readJSON(w, r, &req) || !validTitle(w, &req.Title) {
		return
	}
	if len(req.Key) > maxAddKey {
		writeError(w, http.StatusBadRequest, "the key is too long: %d bytes, at most %d", len(req.Key), maxAddKey)
		return
	}
	listID := mux.Vars(r)["list"]
	it, err := a.db.addItem(writeContext(r), listID, req.Title, req.Key)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	a.changed(w, listKey(listID), http.StatusCreated, it)
}

func (a *api) updateItem(w http.ResponseWriter, r *http.Request) {
	listID, id, ok := itemPath(w, r)
	var req struct {
		Title   *string `json:"title"`
		Done    *bool   `json:"done"`
		Version *int64  `json:"version"`
	}
	if !ok || !readJSON(w, r, &req) {
		return
	}
	if req.Title == nil && req.Done == nil {
		writeError(w, http.StatusBadRequest, `nothing to change: send "title" and/or "done"`)
		return
	}
	if req.Title != nil && !validTitle(w, req.Title) {
		return
	}
	it, err := a.db.updateItem(writeContext(r), listID, id, req.Title, req.Done, req.Version)
	if errors.Is(err, errConflict) {
		// The edit was made on an older version than the item's: tell the
		// page what the item holds now, rather than overwrite someone else's
		// change unseen. The page sends the edit again, with this version,
		// if its user still wants it.
		writeJSON(w, http.StatusConflict, map[string]any{
			"error": fmt.Sprintf("someone else changed this item meanwhile: it reads %q now (version %d, your edit was made on version %d)",
				it.Title, it.Version, *req.Version),
			"item": it,
		})
		return
	}
	if err != nil {
		a.fail(w, r, err)
		return
	}
	a.changed(w, listKey(listID), http.StatusOK, it)
}

func (a *api) deleteItem(w http.ResponseWriter, r *http.Request) {
	listID, id, ok := itemPath(w, r)
	if !ok {
		return
	}
	if err := a.db.deleteItem(writeContext(r), listID, id); err != nil {
		a.fail(w, r, err)
		return
	}
	a.changed(w, listKey(listID), http.StatusOK, struct{}{})
}

// listKey is the key of a list's items.
func listKey(listID string) shared.EntityKey {
	return shared.EntityKey{Entity: entityList, ID: listID}
}

// changed answers a successful write that changed key's rows. With SQLite
// the app tells every server that the key changed; each one that has
// subscribers for it re-reads the rows and pushes them. With Postgres the
// triggers have already done so, at commit.
func (a *api) changed(w http.ResponseWriter, key shared.EntityKey, status int, body any) {
	if !a.db.notifiesItself() {
		if err := a.es.NotifyAllOfChange(key); err != nil {
			a.log.WithError(err).WithField("key", key).Error("notify")
			writeError(w, http.StatusServiceUnavailable, "saved, but the other pages could not be told: %v", err)
			return
		}
	}
	writeJSON(w, status, body)
}

// writeContext is the context a write runs on: not cancelled when the
// browser gives up on the request. A write that may already have reached the
// database must go on to its notification, or the other servers keep the
// old items (the soak run found this in its own server; docs/queues.md,
// "Notify after every write").
func writeContext(r *http.Request) context.Context {
	return context.WithoutCancel(r.Context())
}

// fail answers a store error: 404 for an unknown list or item, otherwise 500
// (the database failed: not the user's fault) with the reason logged.
func (a *api) fail(w http.ResponseWriter, r *http.Request, err error) {
	if errors.Is(err, errNotFound) {
		v := mux.Vars(r)
		if id, ok := v["item"]; ok {
			writeError(w, http.StatusNotFound, "no item %s in list %q", id, v["list"])
		} else {
			writeError(w, http.StatusNotFound, "no list %q", v["list"])
		}
		return
	}
	a.log.WithError(err).WithField("path", r.URL.Path).Error("database")
	writeError(w, http.StatusInternalServerError, "the database failed: %v", err)
}

// itemPath reads the list and item ids from the path; an item id that is not
// a number cannot exist.
func itemPath(w http.ResponseWriter, r *http.Request) (listID string, id int64, ok bool) {
	v := mux.Vars(r)
	id, err := strconv.ParseInt(v["item"], 10, 64)
	if err != nil {
		writeError(w, http.StatusNotFound, "no item %q in list %q", v["item"], v["list"])
		return "", 0, false
	}
	return v["list"], id, true
}

// readJSON decodes the request body into v, or answers why it cannot.
func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	var tooLarge *http.MaxBytesError
	if errors.As(err, &tooLarge) {
		writeError(w, http.StatusRequestEntityTooLarge, "the request is larger than %d bytes", maxBody)
		return false
	} else if err != nil {
		writeError(w, http.StatusBadRequest, "reading the request: %v", err)
		return false
	}
	// encoding/json would quietly turn invalid UTF-8 into U+FFFD, storing a
	// title that is not what the client sent.
	if !utf8.Valid(body) {
		writeError(w, http.StatusBadRequest, "the request is not valid UTF-8")
		return false
	}
	err = json.Unmarshal(body, v)
	var wrongType *json.UnmarshalTypeError
	switch {
	case errors.As(err, &wrongType) && wrongType.Field != "":
		writeError(w, http.StatusBadRequest, "%q must be a %s, not a %s", wrongType.Field, wrongType.Type.Kind(), wrongType.Value)
	case errors.As(err, &wrongType):
		writeError(w, http.StatusBadRequest, "the request must be a JSON object, not a %s", wrongType.Value)
	case err != nil:
		writeError(w, http.StatusBadRequest, "the request is not valid JSON: %v", err)
	}
	return err == nil
}

// validTitle trims *title and checks it, or answers what is wrong with it. A
// title is one line of printable text: a line break or a control character
// (NUL included) would break the page's one-line field and anything that
// prints the lists, so it is refused, with where it is.
func validTitle(w http.ResponseWriter, title *string) bool {
	*title = strings.TrimSpace(*title)
	bad, at := -1, 0
	for i, c := range []rune(*title) {
		if unicode.IsControl(c) || unicode.In(c, unicode.Zl, unicode.Zp) {
			bad, at = int(c), i+1
			break
		}
	}
	switch n := utf8.RuneCountInString(*title); {
	case bad == '\n' || bad == '\r' || bad == 0x85 || bad == 0x2028 || bad == 0x2029:
		writeError(w, http.StatusBadRequest, "the title holds a line break (character %d); a title is one line", at)
	case bad >= 0:
		writeError(w, http.StatusBadRequest, "the title holds the control character U+%04X (character %d); a title is printable text", bad, at)
	case n == 0:
		writeError(w, http.StatusBadRequest, "the title is empty")
	case n > maxTitle:
		writeError(w, http.StatusBadRequest, "the title is too long: %d characters, at most %d", n, maxTitle)
	default:
		return true
	}
	return false
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, format string, args ...any) {
	writeJSON(w, status, map[string]string{"error": fmt.Sprintf(format, args...)})
}
