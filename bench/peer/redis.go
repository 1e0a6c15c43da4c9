//go:build linux

package main

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"time"
)

// Centrifuge's two-server half needs the machine's Redis; these checks
// decide, before any process starts, whether that half runs.

// loopbackOnly refuses an address that is not a loopback IP.
func loopbackOnly(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("%s is not a loopback IP address; the benchmark talks to this machine only", host)
	}
	return nil
}

// pingRedis checks that a Redis server answers PING at addr.
func pingRedis(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("PING answered %q", strings.TrimSpace(line))
	}
	return nil
}
