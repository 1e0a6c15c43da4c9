package esbridge

import (
	"encoding/json"
	"unicode/utf8"

	"github.com/entity-sync/entity-sync/shared"
)

// Every change costs one notification's encoding on the server that
// publishes it and one decoding on every server that serves its entity
// type: encoding/json spends more on that than the rest of a small key's
// round. The common bodies, {"entity":"items","id":"100"} possibly
// followed by a queue wrapper's fields, are read and written here by
// hand; anything else (escapes, a field name in another case, a null)
// takes encoding/json, so the result is always the one it would give.

// decodeNotification reads a queue message's body as encoding/json reads
// it into a shared.Notification. entity is the type the message came for:
// a body naming it shares its string.
func decodeNotification(body []byte, entity shared.EntityType) (shared.Notification, error) {
	if n, ok := parseNotification(body, entity); ok {
		return n, nil
	}
	var n shared.Notification
	err := json.Unmarshal(body, &n)
	return n, err
}

// parseNotification is decodeNotification's fast path: ok is false for
// any body it does not fully understand, valid or not.
func parseNotification(body []byte, entity shared.EntityType) (n shared.Notification, ok bool) {
	p := parser{b: body}
	if !p.byte('{') {
		return n, false
	}
	if p.byte('}') {
		return n, p.end()
	}
	for {
		name, ok := p.plainBytes()
		if !ok || !p.byte(':') {
			return n, false
		}
		switch string(name) {
		case "entity":
			s, ok := p.plainBytes()
			if !ok {
				return n, false
			}
			if string(s) == string(entity) {
				n.Entity = entity
			} else {
				n.Entity = shared.EntityType(s)
			}
		case "id":
			if n.ID, ok = p.plainString(); !ok {
				return n, false
			}
		case "ids":
			if n.IDs, ok = p.plainStrings(n.IDs[:0]); !ok {
				return n, false
			}
		default:
			if name := string(name); !ascii(name) || foldsTo(name, "entity") || foldsTo(name, "id") || foldsTo(name, "ids") {
				return n, false // encoding/json matches field names in any case, Unicode folding included
			}
			if !p.skipValue(0) {
				return n, false
			}
		}
		if p.byte('}') {
			return n, p.end()
		}
		if !p.byte(',') {
			return n, false
		}
	}
}

// parser reads JSON tokens from b; every method skips the white space
// before its token.
type parser struct {
	b []byte
	i int
}

func (p *parser) space() {
	for p.i < len(p.b) {
		switch p.b[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

// byte consumes c if it comes next.
func (p *parser) byte(c byte) bool {
	p.space()
	if p.i < len(p.b) && p.b[p.i] == c {
		p.i++
		return true
	}
	return false
}

// end reports whether only white space is left.
func (p *parser) end() bool {
	p.space()
	return p.i == len(p.b)
}

// plainString reads a string without escapes, of valid UTF-8: its bytes are
// its value.
func (p *parser) plainString() (string, bool) {
	b, ok := p.plainBytes()
	return string(b), ok
}

// plainBytes is plainString without the copy: the bytes are body's.
func (p *parser) plainBytes() ([]byte, bool) {
	if !p.byte('"') {
		return nil, false
	}
	start := p.i
	for p.i < len(p.b) {
		c := p.b[p.i]
		switch {
		case c == '"':
			s := p.b[start:p.i]
			p.i++
			if !utf8.Valid(s) {
				return nil, false // encoding/json would replace the bad bytes
			}
			return s, true
		case c == '\\' || c < 0x20:
			return nil, false
		}
		p.i++
	}
	return nil, false
}

// plainStrings reads an array of plain strings, appended to dst.
func (p *parser) plainStrings(dst []string) ([]string, bool) {
	if !p.byte('[') {
		return nil, false
	}
	if p.byte(']') {
		return []string{}, true
	}
	for {
		s, ok := p.plainString()
		if !ok {
			return nil, false
		}
		dst = append(dst, s)
		if p.byte(']') {
			return dst, true
		}
		if !p.byte(',') {
			return nil, false
		}
	}
}

// maxSkipDepth bounds the nesting of a value skipped: a queue wrapper's
// field is shallow, and anything deeper takes encoding/json.
const maxSkipDepth = 8

// skipValue passes over one valid JSON value of a field the notification
// does not have.
func (p *parser) skipValue(depth int) bool {
	if depth > maxSkipDepth {
		return false
	}
	p.space()
	if p.i == len(p.b) {
		return false
	}
	switch c := p.b[p.i]; {
	case c == '"':
		return p.skipString()
	case c == '{':
		p.i++
		if p.byte('}') {
			return true
		}
		for {
			p.space()
			if p.i == len(p.b) || p.b[p.i] != '"' || !p.skipString() || !p.byte(':') || !p.skipValue(depth+1) {
				return false
			}
			if p.byte('}') {
				return true
			}
			if !p.byte(',') {
				return false
			}
		}
	case c == '[':
		p.i++
		if p.byte(']') {
			return true
		}
		for {
			if !p.skipValue(depth + 1) {
				return false
			}
			if p.byte(']') {
				return true
			}
			if !p.byte(',') {
				return false
			}
		}
	case c == '-' || c >= '0' && c <= '9':
		return p.skipNumber()
	default:
		for _, lit := range [...]string{"true", "false", "null"} {
			if len(p.b)-p.i >= len(lit) && string(p.b[p.i:p.i+len(lit)]) == lit {
				p.i += len(lit)
				return true
			}
		}
		return false
	}
}

// skipString passes over a string, escapes included; at p.b[p.i] == '"'.
func (p *parser) skipString() bool {
	p.i++
	for p.i < len(p.b) {
		c := p.b[p.i]
		switch {
		case c == '"':
			p.i++
			return true
		case c < 0x20:
			return false
		case c == '\\':
			p.i++
			if p.i == len(p.b) {
				return false
			}
			switch p.b[p.i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if len(p.b)-p.i < 5 {
					return false
				}
				for _, h := range p.b[p.i+1 : p.i+5] {
					if !isHex(h) {
						return false
					}
				}
				p.i += 4
			default:
				return false
			}
		}
		p.i++
	}
	return false
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

// skipNumber passes over a number as JSON writes it.
func (p *parser) skipNumber() bool {
	if p.b[p.i] == '-' {
		p.i++
	}
	digits := func() int {
		start := p.i
		for p.i < len(p.b) && p.b[p.i] >= '0' && p.b[p.i] <= '9' {
			p.i++
		}
		return p.i - start
	}
	if p.i < len(p.b) && p.b[p.i] == '0' {
		p.i++
	} else if digits() == 0 {
		return false
	}
	if p.i < len(p.b) && p.b[p.i] == '.' {
		p.i++
		if digits() == 0 {
			return false
		}
	}
	if p.i < len(p.b) && (p.b[p.i] == 'e' || p.b[p.i] == 'E') {
		p.i++
		if p.i < len(p.b) && (p.b[p.i] == '+' || p.b[p.i] == '-') {
			p.i++
		}
		if digits() == 0 {
			return false
		}
	}
	return true
}

func ascii(s string) bool {
	for i := range len(s) {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

// foldsTo reports whether name equals field in ASCII case-insensitively
// without being field itself.
func foldsTo(name, field string) bool {
	if len(name) != len(field) || name == field {
		return false
	}
	for i := range len(name) {
		c := name[i]
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != field[i] {
			return false
		}
	}
	return true
}
