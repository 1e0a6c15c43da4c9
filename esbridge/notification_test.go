package esbridge

import (
	"encoding/json"
	"reflect"
	"testing"

	"github.com/entity-sync/entity-sync/shared"
)

// notificationBodies are bodies the hand-written reader must read as
// encoding/json does, or leave to it.
var notificationBodies = []string{
	`{"entity":"items","id":"100"}`,
	` { "entity" : "items" , "id" : "100" } `,
	`{"entity":"lists","ids":["1","2"]}`,
	`{"entity":"lists","ids":[]}`,
	`{"entity":"lists","ids":null}`,
	`{"entity":"items","id":"1","ids":["2"]}`,
	`{"id":"100"}`,
	`{"entity":"items","id":"100","_es":{"p":"a1b2","n":17}}`,
	`{"_es":{"p":"a1b2","n":17}}`,
	`{"entity":"items","id":"100","x":[1,-2.5e3,true,false,null,"a\"\\\/\b\f\n\r\t\u00e9",{}]}`,
	`{"Entity":"items","ID":"100"}`,
	`{"entity":"items","id":"a\u0041"}`,
	`{"entity":"items","id":"\u00e9t\u00e9"}`,
	`{"entity":"items","id":"été"}`,
	"{\"entity\":\"items\",\"id\":\"\xff\"}",
	`{"entity":"items","id":100}`,
	`{"entity":"items","id":null}`,
	`{"entity":"items","id":"1","id":"2"}`,
	`{"entity":"items","id":"1"`,
	`{"entity":"items","id":"1"}x`,
	`{"entity":"items",}`,
	`{"x":01}`,
	`{"x":-}`,
	`{"x":1.}`,
	`{"x":[[[[[[[[[[[[1]]]]]]]]]]]]}`,
	`{"ıds":["1"],"entity":"items"}`,
	`{"idſ":["1"],"entity":"items"}`,
	`[]`,
	`"items"`,
	``,
	`{}`,
}

// FuzzDecodeNotification checks that decodeNotification reads every body as
// encoding/json does: the same notification, and an error exactly when
// encoding/json gives one.
func FuzzDecodeNotification(f *testing.F) {
	for _, b := range notificationBodies {
		f.Add([]byte(b))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var want shared.Notification
		wantErr := json.Unmarshal(body, &want)
		got, err := decodeNotification(body, "items")
		if (err != nil) != (wantErr != nil) {
			t.Fatalf("%q: error %v, encoding/json's %v", body, err, wantErr)
		}
		if err == nil && !reflect.DeepEqual(got, want) {
			t.Fatalf("%q: read %#v, encoding/json %#v", body, got, want)
		}
	})
}

// TestParseNotificationFastPath checks that the common bodies, a queue
// wrapper's stamp included, do not fall back to encoding/json.
func TestParseNotificationFastPath(t *testing.T) {
	for _, body := range []string{
		`{"entity":"items","id":"100"}`,
		`{"entity":"lists","ids":["1","2"]}`,
		`{"entity":"items","id":"100","_es":{"p":"a1b2","n":17}}`,
	} {
		if _, ok := parseNotification([]byte(body), "items"); !ok {
			t.Errorf("%s: not read by the fast path", body)
		}
	}
}
