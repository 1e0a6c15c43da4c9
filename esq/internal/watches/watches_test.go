package watches

import "testing"

// A route is made by its first Watch, counted by every Watch, and
// forgotten only by the Unwatch that undoes the last; a new Watch then
// starts it afresh.
func TestCounting(t *testing.T) {
	var s Set[*int]
	made := 0
	init := func() *int { made++; v := made; return &v }
	r1, first := s.Watch("a", init)
	if !first || made != 1 {
		t.Fatalf("first Watch: first %v, %d states made", first, made)
	}
	r2, first := s.Watch("a", init)
	if first || r2 != r1 || made != 1 {
		t.Fatalf("second Watch: first %v, same route %v, %d states made", first, r2 == r1, made)
	}
	if n := s.Count("a"); n != 2 {
		t.Fatalf("Count %d, want 2", n)
	}
	if r := s.Unwatch("a"); r != nil {
		t.Fatal("the first of two Unwatches forgot the route")
	}
	if !r1.Watched() || s.Get("a") != r1 {
		t.Fatal("route gone with one Watch left")
	}
	if r := s.Unwatch("a"); r != r1 || r1.Watched() || s.Get("a") != nil || s.Count("a") != 0 {
		t.Fatal("the last Unwatch did not return and forget the route")
	}
	if r := s.Unwatch("a"); r != nil {
		t.Fatal("an Unwatch of a forgotten route returned one")
	}
	r3, first := s.Watch("a", init)
	if !first || r3 == r1 || *r3.State != 2 {
		t.Fatal("a Watch after the last Unwatch did not start the route afresh")
	}
	seen := 0
	s.All(func(*int) { seen++ })
	if seen != 1 {
		t.Fatalf("All saw %d routes, want 1", seen)
	}
}
