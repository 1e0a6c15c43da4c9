// Package watches counts a routing queue's Watch calls per key route (a
// NATS subject, a Redis channel): what esq.Interest asks of every queue
// that routes by key, kept in one place for natsq and redisq, which add
// their broker's subscribe, confirmation and resync.
//
// A route is counted from its first Watch to the Unwatch that undoes the
// last, whatever the broker answered: every Watch counts, a failed one
// too (its caller unwatches it like any other), so a route is never
// forgotten while a caller counts on it.
//
// A Set's methods are called with the queue's lock held, which guards the
// queue's own state of each route (W) as well.
package watches

// Set is a queue's watched routes, by name, with the queue's state W of
// each (a pointer, typically). The zero Set is empty and ready to use.
type Set[W any] struct {
	m map[string]*Route[W]
}

// Route is one watched route.
type Route[W any] struct {
	// State is the queue's own (its subscription, its confirmation).
	State W
	n     int // Watch calls not undone by Unwatch
}

// Watch counts one Watch of name; init makes the route's state on its
// first, which first reports: that caller subscribes to the route.
func (s *Set[W]) Watch(name string, init func() W) (r *Route[W], first bool) {
	if s.m == nil {
		s.m = make(map[string]*Route[W])
	}
	r = s.m[name]
	if r == nil {
		r = &Route[W]{State: init()}
		s.m[name] = r
		first = true
	}
	r.n++
	return r, first
}

// Watched reports whether r is still counted: a subscribe that ran
// without the lock is undone by its caller when the route was unwatched
// meanwhile.
func (r *Route[W]) Watched() bool { return r.n > 0 }

// Unwatch undoes one Watch of name. It returns the route when that was
// its last Watch, the route then being forgotten (the caller unsubscribes
// it), and nil otherwise, or when name is not watched.
func (s *Set[W]) Unwatch(name string) *Route[W] {
	r := s.m[name]
	if r == nil {
		return nil
	}
	if r.n--; r.n > 0 {
		return nil
	}
	delete(s.m, name)
	return r
}

// Get returns the route name, or nil when it is not watched.
func (s *Set[W]) Get(name string) *Route[W] { return s.m[name] }

// Count returns how many Watch calls of name are not undone.
func (s *Set[W]) Count(name string) int {
	if r := s.m[name]; r != nil {
		return r.n
	}
	return 0
}

// All calls f with the state of every watched route.
func (s *Set[W]) All(f func(W)) {
	for _, r := range s.m {
		f(r.State)
	}
}
