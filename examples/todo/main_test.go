package main

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/sirupsen/logrus"

	"github.com/entity-sync/entity-sync/esclient"
	"github.com/entity-sync/entity-sync/internal/nsqtest"
	"github.com/entity-sync/entity-sync/internal/pgtest"
	"github.com/entity-sync/entity-sync/shared"
)

// wait bounds every wait in these tests.
const wait = 15 * time.Second

// TestMain lets the launcher tests run this test binary as the todo command
// itself (and the launcher, in turn, as its servers), without a go build.
func TestMain(m *testing.M) {
	if os.Getenv("TODO_TEST_RUN_MAIN") != "" {
		main()
		return
	}
	os.Exit(m.Run())
}

// runTestServer runs one todo server on a free port until the test ends and
// returns its base URL ("http://127.0.0.1:port").
func runTestServer(t *testing.T, db *store, nsqd string) string {
	t.Helper()
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	return runLoggedServer(t, db, nsqd, log)
}

// runLoggedServer is runTestServer logging to log.
func runLoggedServer(t *testing.T, db *store, nsqd string, log *logrus.Logger) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- serve(ctx, serverConfig{DB: db, NSQD: nsqd, Log: log, Ready: func(string) { close(ready) }}, ln)
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("server did not start: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server shutdown: %v", err)
		}
	})
	return "http://" + ln.Addr().String()
}

func openTestSQLite(t *testing.T, dir string) *store {
	t.Helper()
	db, err := openSQLite(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// call sends a JSON request and returns the status and the decoded body.
func call(t *testing.T, method, url, body string) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	raw, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	if ct := res.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("%s %s: Content-Type %q, body %s", method, url, ct, raw)
	}
	var v map[string]any
	if len(raw) > 0 && raw[0] == '{' {
		if err := json.Unmarshal(raw, &v); err != nil {
			t.Fatalf("%s %s: %v in %s", method, url, err, raw)
		}
	}
	return res.StatusCode, v
}

// mustCall is call for a request that must succeed.
func mustCall(t *testing.T, method, url, body string) map[string]any {
	t.Helper()
	status, v := call(t, method, url, body)
	if status >= 300 {
		t.Fatalf("%s %s %s: %d %v", method, url, body, status, v)
	}
	return v
}

func TestAPIBadInputGets4xxWithAMessage(t *testing.T) {
	db := openTestSQLite(t, t.TempDir())
	base := runTestServer(t, db, "")
	list := mustCall(t, "POST", base+"/api/lists", `{"title":"Groceries"}`)["id"].(string)
	mustCall(t, "POST", base+"/api/lists/"+list+"/items", `{"title":"Milk"}`) // item 1
	items := base + "/api/lists/" + list + "/items"

	for _, tc := range []struct {
		method, path, body string
		status             int
		message            string
	}{
		{"POST", "/api/lists", `{"title":""}`, 400, "the title is empty"},
		{"POST", "/api/lists", `{"title":"   "}`, 400, "the title is empty"},
		{"POST", "/api/lists", `{}`, 400, "the title is empty"},
		{"POST", "/api/lists", `{"title":"` + strings.Repeat("x", 10_000) + `"}`, 400, "the title is too long: 10000 characters, at most 200"},
		{"POST", "/api/lists", `{"title":"` + strings.Repeat("x", 20_000) + `"}`, 413, "larger than 16384 bytes"},
		{"POST", "/api/lists", `{"title":5}`, 400, `"title" must be a string, not a number`},
		{"POST", "/api/lists", `["x"]`, 400, "must be a JSON object, not a array"},
		{"POST", "/api/lists", `{"title":`, 400, "not valid JSON"},
		{"POST", "/api/lists", "{\"title\":\"Caf\xe9\"}", 400, "the request is not valid UTF-8"},
		{"POST", "/api/lists", `{"title":"a\u0000b"}`, 400, "the title holds the control character U+0000 (character 2); a title is printable text"},
		{"POST", "/api/lists", `{"title":"a\u001bb"}`, 400, "control character U+001B"},
		{"POST", "/api/lists", `{"title":"one\ntwo"}`, 400, "the title holds a line break (character 4); a title is one line"},
		{"POST", "/api/lists", `{"title":"one\u2028two"}`, 400, "a line break"},
		{"POST", "/api/lists/" + list + "/items", `{"title":"Milk\r\nEggs"}`, 400, "a line break"},
		{"PATCH", "/api/lists/" + list + "/items/1", `{"title":"Milk\u0007"}`, 400, "control character U+0007"},
		{"PATCH", "/api/lists/" + list + "/items/1", "{\"title\":\"\xc3\"}", 400, "not valid UTF-8"},
		{"PUT", "/api/lists", `{}`, 405, "PUT is not allowed on /api/lists"},
		{"GET", "/api/lists/nope", ``, 404, `no list "nope"`},
		{"POST", "/api/lists/nope/items", `{"title":"Milk"}`, 404, `no list "nope"`},
		{"POST", "/api/lists/" + list + "/items", `{"title":""}`, 400, "the title is empty"},
		{"POST", "/api/lists/" + list + "/items", `{"title":"` + strings.Repeat("é", 201) + `"}`, 400, "201 characters, at most 200"},
		{"PATCH", "/api/lists/" + list + "/items/1", `{}`, 400, "nothing to change"},
		{"PATCH", "/api/lists/" + list + "/items/1", `{"title":""}`, 400, "the title is empty"},
		{"PATCH", "/api/lists/" + list + "/items/1", `{"done":"yes"}`, 400, `"done" must be a bool`},
		{"PATCH", "/api/lists/" + list + "/items/99", `{"done":true}`, 404, `no item 99 in list "` + list + `"`},
		{"PATCH", "/api/lists/nope/items/1", `{"done":true}`, 404, `no item 1 in list "nope"`},
		{"DELETE", "/api/lists/" + list + "/items/abc", ``, 404, `no item "abc"`},
		{"DELETE", "/api/lists/" + list + "/items/99", ``, 404, `no item 99`},
		{"GET", "/nothing/here", ``, 404, "nothing at /nothing/here"},
	} {
		status, v := call(t, tc.method, base+tc.path, tc.body)
		msg, _ := v["error"].(string)
		if status != tc.status || !strings.Contains(msg, tc.message) {
			t.Errorf("%s %s %.40s: got %d %q, want %d with %q", tc.method, tc.path, tc.body, status, msg, tc.status, tc.message)
		}
	}

	// None of it hurt the list: item 1 is intact, and writes still work.
	mustCall(t, "PATCH", items+"/1", `{"done":true,"title":"  Oat milk "}`)
	got, err := db.items(context.Background(), list)
	if want := []item{{ID: 1, Title: "Oat milk", Done: true, Version: 2}}; err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("items: %v %v, want %v", got, err, want)
	}
}

// A database made before items had versions or add keys is given the
// columns: its items start at version 1.
func TestOldDatabaseGetsVersions(t *testing.T) {
	dir := t.TempDir()
	old, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "todo.db"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = old.Exec(`CREATE TABLE todo_lists (id TEXT PRIMARY KEY, title TEXT NOT NULL, created BIGINT NOT NULL);
		CREATE TABLE todo_items (id INTEGER PRIMARY KEY AUTOINCREMENT, list_id TEXT NOT NULL REFERENCES todo_lists (id) ON DELETE CASCADE,
			title TEXT NOT NULL, done BOOLEAN NOT NULL DEFAULT FALSE);
		INSERT INTO todo_lists VALUES ('l', 'Old', 1);
		INSERT INTO todo_items (list_id, title) VALUES ('l', 'Milk');`)
	old.Close()
	if err != nil {
		t.Fatal(err)
	}
	db := openTestSQLite(t, dir)
	items, err := db.items(context.Background(), "l")
	if want := []item{{ID: 1, Title: "Milk", Version: 1}}; err != nil || !reflect.DeepEqual(items, want) {
		t.Fatalf("items: %v %v, want %v", items, err, want)
	}
	// And add keys (the unique index needs the column).
	first, err := db.addItem(context.Background(), "l", "Eggs", "k")
	if err != nil {
		t.Fatal(err)
	}
	if again, err := db.addItem(context.Background(), "l", "Eggs", "k"); err != nil || again != first {
		t.Errorf("an add sent again with its key: %v %v, want %v", again, err, first)
	}
	openTestSQLite(t, dir) // and again: the columns are there now
}

// A server says at start which queue links it to the others; one on the
// in-process queue warns that it syncs with no other server and names the
// flags that fix it.
func TestServerLogsItsQueue(t *testing.T) {
	dir := t.TempDir()
	nsqd := nsqtest.StartNSQD(t)
	for _, tc := range []struct {
		nsqd, queue string
		warns       bool
	}{
		{"", `queue="in-process (this server only)"`, true},
		{nsqd.TCPAddr(), `queue="NSQ (nsqd ` + nsqd.TCPAddr() + `)"`, false},
	} {
		var out lockedBuffer
		log := logrus.New()
		log.SetOutput(&out) // the start lines are written before runLoggedServer returns
		log.SetFormatter(&logrus.TextFormatter{DisableColors: true, DisableTimestamp: true})
		runLoggedServer(t, openTestSQLite(t, dir), tc.nsqd, log)
		lines := out.String()
		if !regexp.MustCompile(`level=info msg=serving .*` + regexp.QuoteMeta(tc.queue)).MatchString(lines) {
			t.Errorf("with -nsqd %q the start log does not name the queue as %s:\n%s", tc.nsqd, tc.queue, lines)
		}
		warned := strings.Contains(lines, "level=warning") && strings.Contains(lines, "does not sync servers") &&
			strings.Contains(lines, "-nsqd HOST:PORT") && strings.Contains(lines, "-pg")
		if warned != tc.warns {
			t.Errorf("with -nsqd %q: warned %v, want %v:\n%s", tc.nsqd, warned, tc.warns, lines)
		}
	}
}

// lockedBuffer is a log's output that a test may read while the server
// still writes to it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// editConflicts checks, through server a, that an edit naming the version
// its user saw is refused with 409 and the item as it is now once someone
// else changed it, and goes through on the current version.
func editConflicts(t *testing.T, a string, db *store) {
	t.Helper()
	listID := mustCall(t, "POST", a+"/api/lists", `{"title":"Shared"}`)["id"].(string)
	created := mustCall(t, "POST", a+"/api/lists/"+listID+"/items", `{"title":"Milk"}`)
	if created["version"] != 1.0 {
		t.Fatalf("a new item: %v, want version 1", created)
	}
	url := fmt.Sprint(a, "/api/lists/", listID, "/items/", created["id"])
	// Two pages saw version 1; the first edit wins.
	if v := mustCall(t, "PATCH", url, `{"title":"Oat milk","version":1}`); v["version"] != 2.0 || v["title"] != "Oat milk" {
		t.Fatalf("the first edit: %v, want version 2", v)
	}
	status, v := call(t, "PATCH", url, `{"title":"Soy milk","version":1}`)
	msg, _ := v["error"].(string)
	now, _ := v["item"].(map[string]any)
	if status != http.StatusConflict || !strings.Contains(msg, `someone else changed this item meanwhile: it reads "Oat milk" now (version 2, your edit was made on version 1)`) ||
		now["title"] != "Oat milk" || now["version"] != 2.0 {
		t.Fatalf("the second edit on version 1: %d %v, want 409 with the item at version 2", status, v)
	}
	// Told, its user keeps their edit: sent again on the version now seen.
	mustCall(t, "PATCH", url, `{"title":"Soy milk","version":2}`)
	// A tick names no version: it sets one flag, whatever the title.
	mustCall(t, "PATCH", url, `{"done":true}`)
	items, err := db.items(context.Background(), listID)
	if want := []item{{ID: int64(created["id"].(float64)), Title: "Soy milk", Done: true, Version: 4}}; err != nil || !reflect.DeepEqual(items, want) {
		t.Errorf("items: %v %v, want %v", items, err, want)
	}
	if status, v := call(t, "PATCH", a+"/api/lists/"+listID+"/items/999", `{"title":"x","version":1}`); status != 404 {
		t.Errorf("an edit of an unknown item with a version: %d %v, want 404", status, v)
	}
}

func TestEditOfAChangedItemConflicts(t *testing.T) {
	db := openTestSQLite(t, t.TempDir())
	editConflicts(t, runTestServer(t, db, ""), db)
}

// addsOnce checks, through server a, that an add sent again with the same
// key (a page that got no answer retries) saves nothing more and is
// answered with the item the key first added, while another key adds
// another item.
func addsOnce(t *testing.T, a string, db *store) {
	t.Helper()
	listID := mustCall(t, "POST", a+"/api/lists", `{"title":"Retries"}`)["id"].(string)
	items := a + "/api/lists/" + listID + "/items"
	add := func(body string) map[string]any {
		t.Helper()
		status, v := call(t, "POST", items, body)
		if status != http.StatusCreated {
			t.Fatalf("POST %s: %d %v, want 201", body, status, v)
		}
		return v
	}
	first := add(`{"title":"Milk","key":"k1"}`)
	if again := add(`{"title":"Milk","key":"k1"}`); !reflect.DeepEqual(again, first) {
		t.Errorf("the add sent again with its key: %v, want the first answer %v", again, first)
	}
	other := add(`{"title":"Milk","key":"k2"}`)
	if other["id"] == first["id"] {
		t.Errorf("another key: %v, want another item than %v", other, first)
	}
	id1, id2 := int64(first["id"].(float64)), int64(other["id"].(float64))
	want := []item{{ID: id1, Title: "Milk", Version: 1}, {ID: id2, Title: "Milk", Version: 1}}
	if got, err := db.items(context.Background(), listID); err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("items: %v %v, want %v", got, err, want)
	}

	// A retry that comes after an edit gets the item as it is now.
	mustCall(t, "PATCH", fmt.Sprint(items, "/", id1), `{"done":true}`)
	if again := add(`{"title":"Milk","key":"k1"}`); again["done"] != true || again["version"] != 2.0 || again["id"] != first["id"] {
		t.Errorf("the add sent again after a tick: %v, want item %v done at version 2", again, first["id"])
	}
	// Adds without a key are each saved; a key is the list's own.
	add(`{"title":"Bread"}`)
	add(`{"title":"Bread"}`)
	otherList := mustCall(t, "POST", a+"/api/lists", `{"title":"Other"}`)["id"].(string)
	if v := mustCall(t, "POST", a+"/api/lists/"+otherList+"/items", `{"title":"Milk","key":"k1"}`); v["id"] == first["id"] {
		t.Errorf("the same key in another list: %v, want an item of its own", v)
	}

	// Attempts racing each other (a retry sent while the first is still
	// running) save one item too, and all get it.
	const n = 8
	answers := make(chan map[string]any, n)
	for range n {
		go func() { // not call: it may stop the test, which only the test's goroutine may
			var v map[string]any
			res, err := http.Post(items, "application/json", strings.NewReader(`{"title":"Eggs","key":"k3"}`))
			if err == nil {
				err = json.NewDecoder(res.Body).Decode(&v)
				res.Body.Close()
			}
			if err != nil {
				v = map[string]any{"error": err.Error()}
			}
			answers <- v
		}()
	}
	var eggs any
	for range n {
		v := <-answers
		if eggs == nil {
			eggs = v["id"]
		}
		if v["id"] != eggs || v["title"] != "Eggs" {
			t.Errorf("racing adds with one key: %v, want item %v", v, eggs)
		}
	}
	got, err := db.items(context.Background(), listID)
	if err != nil || len(got) != 5 {
		t.Errorf("items after the racing adds: %v %v, want 5 (Milk twice, Bread twice, Eggs)", got, err)
	}

	status, v := call(t, "POST", items, `{"title":"Milk","key":"`+strings.Repeat("k", 101)+`"}`)
	if msg, _ := v["error"].(string); status != 400 || !strings.Contains(msg, "the key is too long: 101 bytes, at most 100") {
		t.Errorf("a key of 101 bytes: %d %v, want 400", status, v)
	}
}

func TestAddSentAgainWithItsKeyIsSavedOnce(t *testing.T) {
	db := openTestSQLite(t, t.TempDir())
	addsOnce(t, runTestServer(t, db, ""), db)
}

// watch subscribes to a list on the server at base, as the page does, and
// returns the items of each push, in order.
func watch(t *testing.T, base, listID string) <-chan []item {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := esclient.Dial(ctx, "ws"+strings.TrimPrefix(base, "http")+shared.WebsocketPath, esclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	pushes := make(chan []item, 1000)
	c.Subscribe(shared.EntityKey{Entity: entityList, ID: listID}, func(rows []json.RawMessage) {
		items := make([]item, len(rows))
		for i, row := range rows {
			if err := json.Unmarshal(row, &items[i]); err != nil {
				t.Errorf("row %s: %v", row, err)
			}
		}
		pushes <- items
	}, func() { pushes <- []item{} })
	return pushes
}

// watchLists subscribes to the home page's key on the server at base, as
// the page does, and returns the lists of each push, in order.
func watchLists(t *testing.T, base, id string) <-chan []list {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := esclient.Dial(ctx, "ws"+strings.TrimPrefix(base, "http")+shared.WebsocketPath, esclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	pushes := make(chan []list, 1000)
	c.Subscribe(shared.EntityKey{Entity: entityLists, ID: id}, func(rows []json.RawMessage) {
		ls := make([]list, len(rows))
		for i, row := range rows {
			if err := json.Unmarshal(row, &ls[i]); err != nil {
				t.Errorf("row %s: %v", row, err)
			}
		}
		pushes <- ls
	}, func() { pushes <- []list{} })
	return pushes
}

// awaitLists waits until a push holds exactly want.
func awaitLists(t *testing.T, pushes <-chan []list, want ...list) {
	t.Helper()
	if want == nil {
		want = []list{}
	}
	timeout := time.After(wait)
	var last []list
	for {
		select {
		case last = <-pushes:
			if reflect.DeepEqual(last, want) {
				return
			}
		case <-timeout:
			t.Fatalf("the home page shows %v, want %v", last, want)
		}
	}
}

// The home page is live: a list created through one server reaches a page
// on the other, newest first, without a reload.
func TestListsReachTheHomePageLive(t *testing.T) {
	dir := t.TempDir()
	nsqd := nsqtest.StartNSQD(t)
	a := runTestServer(t, openTestSQLite(t, dir), nsqd.TCPAddr())
	b := runTestServer(t, openTestSQLite(t, dir), nsqd.TCPAddr())
	homeLists(t, a, b, nil)
}

// homeLists creates two lists through a and checks that a page on b's home
// page shows each at once; rename, if set, renames a list behind the app's
// back (Postgres: with SQL), and the page must show that too.
func homeLists(t *testing.T, a, b string, rename func(id, title string)) {
	t.Helper()
	onB := watchLists(t, b, listsRecent)
	awaitLists(t, onB)                       // no list yet: "gone"
	awaitLists(t, watchLists(t, b, "other")) // no such key: gone
	groceries := mustCall(t, "POST", a+"/api/lists", `{"title":"Groceries"}`)["id"].(string)
	awaitLists(t, onB, list{ID: groceries, Title: "Groceries"})
	chores := mustCall(t, "POST", a+"/api/lists", `{"title":"Chores"}`)["id"].(string)
	awaitLists(t, onB, list{ID: chores, Title: "Chores"}, list{ID: groceries, Title: "Groceries"})
	if rename != nil {
		rename(groceries, "Food")
		awaitLists(t, onB, list{ID: chores, Title: "Chores"}, list{ID: groceries, Title: "Food"})
	}
}

// awaitItems waits until a push holds exactly want; versions are compared
// only if want gives them.
func awaitItems(t *testing.T, pushes <-chan []item, want ...item) {
	t.Helper()
	if want == nil {
		want = []item{}
	}
	versions := false
	for _, it := range want {
		versions = versions || it.Version != 0
	}
	timeout := time.After(wait)
	var last []item
	for {
		select {
		case last = <-pushes:
			if !versions {
				for i := range last {
					last[i].Version = 0
				}
			}
			if reflect.DeepEqual(last, want) {
				return
			}
		case <-timeout:
			t.Fatalf("the list shows %v, want %v", last, want)
		}
	}
}

// exercise makes changes through server a and checks that a page on server
// b sees each of them.
func exercise(t *testing.T, a, b string) (listID string) {
	t.Helper()
	listID = mustCall(t, "POST", a+"/api/lists", `{"title":"Groceries"}`)["id"].(string)
	if status, v := call(t, "GET", b+"/api/lists/"+listID, ""); status != 200 || v["title"] != "Groceries" {
		t.Fatalf("server b does not know the list: %d %v", status, v)
	}
	onB := watch(t, b, listID)
	awaitItems(t, onB) // empty: "gone"

	items := a + "/api/lists/" + listID + "/items"
	milk := int64(mustCall(t, "POST", items, `{"title":"Milk"}`)["id"].(float64))
	awaitItems(t, onB, item{ID: milk, Title: "Milk"})
	bread := int64(mustCall(t, "POST", items, `{"title":"Bread"}`)["id"].(float64))
	awaitItems(t, onB, item{ID: milk, Title: "Milk"}, item{ID: bread, Title: "Bread"})
	mustCall(t, "PATCH", fmt.Sprint(items, "/", milk), `{"done":true}`)
	mustCall(t, "PATCH", fmt.Sprint(items, "/", bread), `{"title":"Rye bread"}`)
	awaitItems(t, onB, item{ID: milk, Title: "Milk", Done: true}, item{ID: bread, Title: "Rye bread"})
	mustCall(t, "DELETE", fmt.Sprint(items, "/", milk), "")
	awaitItems(t, onB, item{ID: bread, Title: "Rye bread"})
	return listID
}

// A list is a collection: a page gets the list in full once, then only the
// items that changed, named by their ids.
func TestListChangesArriveAsDiffs(t *testing.T) {
	base := runTestServer(t, openTestSQLite(t, t.TempDir()), "")
	listID := mustCall(t, "POST", base+"/api/lists", `{"title":"Groceries"}`)["id"].(string)
	items := base + "/api/lists/" + listID + "/items"
	for _, title := range []string{"Milk", "Bread", "Eggs"} {
		mustCall(t, "POST", items, `{"title":"`+title+`"}`)
	}

	// The envelope protocol, read raw, as the page's client receives it.
	d := websocket.Dialer{Subprotocols: []string{shared.Subprotocol}}
	ws, _, err := d.Dial("ws"+strings.TrimPrefix(base, "http")+shared.WebsocketPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	type frame struct {
		Type   string
		IDs    []string
		Rows   []item
		Upsert []struct {
			ID  string
			Row item
		}
		Remove []string
	}
	// next returns the next frame that is a key's state.
	next := func() frame {
		t.Helper()
		for {
			var f frame
			ws.SetReadDeadline(time.Now().Add(wait))
			if err := ws.ReadJSON(&f); err != nil {
				t.Fatal(err)
			}
			switch f.Type {
			case "rows", "gone", "diff", "unchanged":
				return f
			}
		}
	}
	sub := fmt.Sprintf(`{"action":"subscribe","body":{"entity":%q,"id":%q}}`, entityList, listID)
	if err := ws.WriteMessage(websocket.TextMessage, []byte(sub)); err != nil {
		t.Fatal(err)
	}
	first := next()
	if want := []string{"1", "2", "3"}; first.Type != "rows" || !reflect.DeepEqual(first.IDs, want) || len(first.Rows) != 3 {
		t.Fatalf("first state: %+v, want rows with ids %v", first, want)
	}

	mustCall(t, "PATCH", items+"/2", `{"done":true}`)
	f := next()
	if f.Type != "diff" || len(f.Rows) != 0 || len(f.Remove) != 0 || len(f.Upsert) != 1 ||
		f.Upsert[0].ID != "2" || f.Upsert[0].Row != (item{ID: 2, Title: "Bread", Done: true, Version: 2}) {
		t.Fatalf("after ticking item 2: %+v, want a diff with item 2 alone", f)
	}
	mustCall(t, "DELETE", items+"/1", "")
	if f := next(); f.Type != "diff" || !reflect.DeepEqual(f.Remove, []string{"1"}) || len(f.Upsert) != 0 {
		t.Fatalf("after deleting item 1: %+v, want a diff removing item 1", f)
	}
}

// Two servers, each with its own connection to one SQLite file, and NSQ
// between them: what is written through one is pushed by the other.
func TestTwoServersShareSQLiteThroughNSQ(t *testing.T) {
	dir := t.TempDir()
	nsqd := nsqtest.StartNSQD(t)
	a := runTestServer(t, openTestSQLite(t, dir), nsqd.TCPAddr())
	b := runTestServer(t, openTestSQLite(t, dir), nsqd.TCPAddr())
	exercise(t, a, b)

	// The operator's endpoints: probes, and metrics that counted the above
	// (server b holds the test's one subscription and fetched the list).
	for path, want := range map[string]string{"/healthz": "ok\n", "/readyz": "ready\n"} {
		if status, body := get(t, b+path); status != 200 || body != want {
			t.Errorf("%s: %d %q, want 200 %q", path, status, body, want)
		}
	}
	_, metrics := get(t, b+"/metrics")
	for _, want := range []string{"\nentitysync_subscriptions 1\n", "\nentitysync_ready 1\n", "\nentitysync_fetches_total ", "\ngo_goroutines "} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", strings.TrimSpace(want))
		}
	}
}

// get returns the status and body of a GET.
func get(t *testing.T, url string) (int, string) {
	t.Helper()
	res, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return res.StatusCode, string(b)
}

// postgresStores gives a test a schema of its own in the test database, and
// a function that opens a store on it (as one server does).
func postgresStores(t *testing.T) (pool *pgxpool.Pool, schema string, open func() *store) {
	t.Helper()
	pool = pgtest.Pool(t)
	schema = pgtest.Schema(t, pool)
	dsn := pgtest.DSN()
	if strings.Contains(dsn, "?") {
		dsn += "&search_path=" + schema
	} else {
		dsn += "?search_path=" + schema
	}
	return pool, schema, func() *store {
		db, err := openPostgres(context.Background(), dsn)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		return db
	}
}

// With Postgres, the trigger notifies at commit (the app does not), and a
// write from another program (SQL straight to the table) is pushed too.
func TestTwoServersSharePostgres(t *testing.T) {
	pool, schema, open := postgresStores(t)
	dbA := open()
	a, b := runTestServer(t, dbA, ""), runTestServer(t, open(), "")
	listID := exercise(t, a, b)

	onA := watch(t, a, listID)
	awaitItems(t, onA, item{ID: 2, Title: "Rye bread"})
	pgtest.Exec(t, pool, "INSERT INTO "+schema+".todo_items (list_id, title, done) VALUES ($1, 'Eggs', true)", listID)
	awaitItems(t, onA, item{ID: 2, Title: "Rye bread"}, item{ID: 3, Title: "Eggs", Done: true})
	editConflicts(t, a, dbA)
	addsOnce(t, a, dbA)
}

// With Postgres the home page is live too, renames made with SQL included:
// a statement trigger on the lists table notifies its key.
func TestHomePageLiveOnPostgres(t *testing.T) {
	pool, schema, open := postgresStores(t)
	a, b := runTestServer(t, open(), ""), runTestServer(t, open(), "")
	homeLists(t, a, b, func(id, title string) {
		pgtest.Exec(t, pool, "UPDATE "+schema+".todo_lists SET title = $2 WHERE id = $1", id, title)
	})
}

// launcher is the todo command run as a user runs it (this test binary
// stands in for it, see TestMain), with two servers on free ports.
type launcher struct {
	cmd     *exec.Cmd
	urls    []string // the two servers' URLs, as printed
	servers []int    // the servers' process ids
	// restarted are the process ids of servers it started again.
	restarted []int
	exited    chan error
	log       *os.File    // its output, stdout and stderr
	notes     chan string // the lines it prints on stdout about its servers ("todo: ...")
}

// output is what the launcher and its servers printed so far.
func (l *launcher) output() string {
	b, _ := os.ReadFile(l.log.Name())
	return string(b)
}

var urlLine = regexp.MustCompile(`^\s+(http://127\.0\.0\.1:\d+)/$`)

func startLauncher(t *testing.T) *launcher {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("finds the server processes through /proc")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	log, err := os.Create(filepath.Join(dir, "output"))
	if err != nil {
		t.Fatal(err)
	}
	l := &launcher{exited: make(chan error, 1), log: log, notes: make(chan string, 100)}
	l.cmd = exec.Command(exe, "-listen", "127.0.0.1:0,127.0.0.1:0", "-data", dir)
	l.cmd.Env = append(os.Environ(), "TODO_TEST_RUN_MAIN=1")
	l.cmd.Stderr = log
	stdout, err := l.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	urls := make(chan string, 2)
	go func() {
		lines := bufio.NewScanner(stdout)
		for lines.Scan() {
			fmt.Fprintln(l.log, lines.Text())
			if m := urlLine.FindStringSubmatch(lines.Text()); m != nil {
				urls <- m[1]
			}
			if strings.HasPrefix(lines.Text(), "todo: ") {
				l.notes <- lines.Text()
			}
		}
		l.exited <- l.cmd.Wait()
		log.Close()
	}()
	t.Cleanup(func() {
		// Whatever the test did not stop, so that a failure leaves no process.
		_ = l.cmd.Process.Kill()
		for _, pid := range append(l.servers, l.restarted...) {
			if running(pid) {
				_ = kill(pid)
			}
		}
		if t.Failed() {
			t.Logf("the launcher's output:\n%s", l.output())
		}
	})
	for len(l.urls) < 2 {
		select {
		case u := <-urls:
			l.urls = append(l.urls, u)
		case err := <-l.exited:
			t.Fatalf("the launcher exited (%v) before printing two URLs:\n%s", err, l.output())
		case <-time.After(time.Minute):
			t.Fatalf("the launcher printed no two URLs within a minute:\n%s", l.output())
		}
	}
	l.servers = childrenOf(t, l.cmd.Process.Pid)
	if len(l.servers) != 2 {
		t.Fatalf("the launcher has %d child processes, want 2", len(l.servers))
	}
	return l
}

// awaitExit waits for the launcher to exit and returns its exit error.
func (l *launcher) awaitExit(t *testing.T) error {
	t.Helper()
	select {
	case err := <-l.exited:
		return err
	case <-time.After(2 * shutdownTimeout):
		t.Fatalf("the launcher did not exit")
		return nil
	}
}

// awaitServersGone waits until no server process runs any more. They are not
// our children, so there is nothing to wait on but /proc.
func (l *launcher) awaitServersGone(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(2 * shutdownTimeout)
	for _, pid := range l.servers {
		for running(pid) {
			if time.Now().After(deadline) {
				t.Fatalf("server process %d still runs", pid)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// kill ends process pid at once.
func kill(pid int) error {
	p, err := os.FindProcess(pid)
	if err != nil {
		return err
	}
	return p.Kill()
}

// childrenOf lists the processes whose parent is pid.
func childrenOf(t *testing.T, pid int) []int {
	t.Helper()
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		t.Fatal(err)
	}
	var kids []int
	for _, f := range stats {
		var child, parent int
		var state string
		if b, err := os.ReadFile(f); err == nil && parseStat(b, &child, &state, &parent) && parent == pid {
			kids = append(kids, child)
		}
	}
	return kids
}

// running reports whether process pid exists and is not a zombie (an exited
// process nobody reaped).
func running(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	var p, parent int
	var state string
	return err == nil && parseStat(b, &p, &state, &parent) && state != "Z"
}

// parseStat reads pid, state and parent pid from /proc/PID/stat ("pid (comm)
// state ppid ..."; comm may hold spaces and parentheses).
func parseStat(b []byte, pid *int, state *string, parent *int) bool {
	s := string(b)
	open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || end < open {
		return false
	}
	_, err1 := fmt.Sscan(s[:open], pid)
	_, err2 := fmt.Sscan(s[end+1:], state, parent)
	return err1 == nil && err2 == nil
}

// The one command: two server processes sharing the database and nsqd;
// Ctrl-C stops all of them, cleanly.
func TestLauncherRunsTwoServersUntilCtrlC(t *testing.T) {
	l := startLauncher(t)
	exercise(t, l.urls[0], l.urls[1])
	if err := l.cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	if err := l.awaitExit(t); err != nil {
		t.Errorf("the launcher exited with %v after Ctrl-C, want 0", err)
	}
	l.awaitServersGone(t)
}

// A launcher killed outright leaves no server behind: each stops when its
// stdin, held open by the launcher, closes.
func TestLauncherKilledLeavesNoServer(t *testing.T) {
	l := startLauncher(t)
	if err := l.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	l.awaitExit(t)
	l.awaitServersGone(t)
}

// A server that dies is started again on its address, and the launcher
// says so; the other server keeps serving meanwhile, and once the first is
// back the two sync again.
func TestLauncherRestartsAServerThatDies(t *testing.T) {
	l := startLauncher(t)
	listID := exercise(t, l.urls[0], l.urls[1])
	onB := watch(t, l.urls[1], listID)
	awaitItems(t, onB, item{ID: 2, Title: "Rye bread"})

	if err := kill(l.servers[0]); err != nil {
		t.Fatal(err)
	}
	// Server b serves on, writes included, whatever server a is doing.
	items := l.urls[1] + "/api/lists/" + listID + "/items"
	mustCall(t, "POST", items, `{"title":"Eggs"}`)
	awaitItems(t, onB, item{ID: 2, Title: "Rye bread"}, item{ID: 3, Title: "Eggs"})

	note := func(want string) {
		t.Helper()
		select {
		case line := <-l.notes:
			if !strings.Contains(line, want) {
				t.Fatalf("the launcher printed %q, want %q", line, want)
			}
		case err := <-l.exited:
			t.Fatalf("the launcher exited (%v):\n%s", err, l.output())
		case <-time.After(time.Minute):
			t.Fatalf("the launcher did not print %q:\n%s", want, l.output())
		}
	}
	addr := strings.TrimPrefix(l.urls[0], "http://")
	note("todo: the server for " + addr + " stopped (signal: killed); restarting it")
	note("todo: the server for " + addr + " serves again at " + l.urls[0] + "/")
	for _, pid := range childrenOf(t, l.cmd.Process.Pid) {
		if pid != l.servers[1] {
			l.restarted = append(l.restarted, pid)
		}
	}
	if len(l.restarted) != 1 || l.restarted[0] == l.servers[0] {
		t.Fatalf("the launcher's children are %v, want %d and one new", childrenOf(t, l.cmd.Process.Pid), l.servers[1])
	}

	// The restarted server reads the same database and syncs through the
	// same nsqd: a page on it sees the list, and a change made on b.
	onA := watch(t, l.urls[0], listID)
	awaitItems(t, onA, item{ID: 2, Title: "Rye bread"}, item{ID: 3, Title: "Eggs"})
	mustCall(t, "PATCH", items+"/3", `{"done":true}`)
	awaitItems(t, onA, item{ID: 2, Title: "Rye bread"}, item{ID: 3, Title: "Eggs", Done: true})
	exercise(t, l.urls[1], l.urls[0])

	if err := l.cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	if err := l.awaitExit(t); err != nil {
		t.Errorf("the launcher exited with %v after Ctrl-C, want 0", err)
	}
	l.servers = append(l.servers, l.restarted...)
	l.awaitServersGone(t)
}
