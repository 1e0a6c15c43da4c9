package esbridge

import (
	"testing"
	"time"
)

// A MaxRetryDelay below RetryDelay used to be replaced by 30 s, so retries
// waited longer than either setting asked for.
func TestMaxRetryDelayIsNeverBelowRetryDelay(t *testing.T) {
	for _, c := range []struct{ retry, max, want time.Duration }{
		{0, 0, 30 * time.Second},
		{2 * time.Second, time.Second, 2 * time.Second},
		{time.Second, 5 * time.Second, 5 * time.Second},
		{time.Minute, 0, time.Minute},
	} {
		o := Options{RetryDelay: c.retry, MaxRetryDelay: c.max}
		o.setDefaults()
		if o.MaxRetryDelay != c.want {
			t.Errorf("RetryDelay %v, MaxRetryDelay %v: got max %v, want %v", c.retry, c.max, o.MaxRetryDelay, c.want)
		}
	}
}
