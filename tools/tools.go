//go:build tools

// Package tools pins the NSQ broker binaries that local clusters and
// docker-free manual testing use. It lives in its own module so the library's
// go.mod never carries the go-svc replace that building nsq's apps needs.
//
// Build them with:
//
//	cd tools && go build -o ../bin/ github.com/nsqio/nsq/apps/nsqd github.com/nsqio/nsq/apps/nsqlookupd
package tools

import (
	_ "github.com/nsqio/nsq/apps/nsqd"
	_ "github.com/nsqio/nsq/apps/nsqlookupd"
)
