package esclient

import "time"

// WithMaxJitter makes every backoff delay the full ceiling, so a test can
// tell the ceilings from the delays.
func WithMaxJitter(o Options) Options {
	o.jitter = func(ceil time.Duration) time.Duration { return ceil }
	return o
}

// Resyncs returns how many subscribes c sent because a state frame did not
// apply to the state it held.
func Resyncs(c *Client) uint64 { return c.resyncs.Load() }
