package esweb

import "time"

// SetMaxThrottle shortens how long the rate limit may hold a connection back
// before closing it, for a test, and returns the function that restores it.
func SetMaxThrottle(d time.Duration) (restore func()) {
	old := maxThrottle.Swap(int64(d))
	return func() { maxThrottle.Store(old) }
}

// SetOpenedHook makes s call f in ServeHTTP right after each connection is
// registered, before the request's handler returns.
func SetOpenedHook(s *Server, f func()) { s.openedHook.Store(&f) }
