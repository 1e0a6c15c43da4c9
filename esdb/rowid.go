package esdb

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// RowID names one row of a collection: given a row as the fetch function
// returned it, it returns the row's id, unique among the rows of one fetch.
// It runs once per row per change per server, so it should be cheap.
type RowID func(row []byte) (string, error)

// JSONField returns a RowID for rows that are JSON objects: the id is the
// value of the top-level field name, a string (its text) or a number (its
// JSON text, as written: 7 and 7.0 are different ids). Any other value, a
// missing field or a row that is not a JSON object is an error.
func JSONField(name string) RowID {
	return func(row []byte) (string, error) {
		if !json.Valid(row) {
			return "", errors.New("row is not valid JSON")
		}
		v, ok := topLevelField(row, name)
		if !ok {
			return "", fmt.Errorf("row has no top-level field %q", name)
		}
		switch c := v[0]; {
		case c == '"':
			if bytes.IndexByte(v, '\\') < 0 {
				return string(v[1 : len(v)-1]), nil
			}
			var s string
			if err := json.Unmarshal(v, &s); err != nil {
				return "", err
			}
			return s, nil
		case c == '-' || c >= '0' && c <= '9':
			return string(v), nil
		}
		return "", fmt.Errorf("field %q is neither a string nor a number", name)
	}
}

// topLevelField returns the raw value of the last top-level field called
// name (as encoding/json reads duplicates) of row, which must be valid
// JSON. It scans instead of decoding: a collection's ids are read for
// every row of every change, and a decode into a map allocates for every
// field of every row.
func topLevelField(row []byte, name string) ([]byte, bool) {
	i := skipSpace(row, 0)
	if i >= len(row) || row[i] != '{' {
		return nil, false
	}
	var found []byte
	i++
	for {
		i = skipSpace(row, i)
		if i >= len(row) || row[i] == '}' {
			return found, found != nil
		}
		if row[i] == ',' {
			i = skipSpace(row, i+1)
		}
		keyEnd := skipValue(row, i) // the key is a string
		key := row[i:keyEnd]
		i = skipSpace(row, keyEnd)
		i = skipSpace(row, i+1) // the colon
		end := skipValue(row, i)
		if keyIs(key, name) {
			found = row[i:end]
		}
		i = end
	}
}

// keyIs reports whether the JSON string key (quotes included) reads name.
func keyIs(key []byte, name string) bool {
	if bytes.IndexByte(key, '\\') < 0 {
		return string(key[1:len(key)-1]) == name
	}
	var s string
	return json.Unmarshal(key, &s) == nil && s == name
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipValue returns the index just past the JSON value starting at b[i]
// (b is valid JSON).
func skipValue(b []byte, i int) int {
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				i = skipString(b, i)
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return i
	}
	for i < len(b) {
		switch b[i] {
		case ',', '}', ']', ' ', '\t', '\n', '\r':
			return i
		}
		i++
	}
	return i
}

// skipString returns the index just past the JSON string starting at b[i].
func skipString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return i
}
