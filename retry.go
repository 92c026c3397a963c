package async

import (
	"math"
	"time"
)

// RetryPolicy decides, after a job's failures-th failure (this one included),
// how long to wait before the next run and at which priority it runs.
type RetryPolicy func(job *Job, failures int) (delay time.Duration, priority int)

// DefaultRetryPolicy is the reference system's policy: wait 60·n^1.6 seconds
// after the n-th failure and lower the priority by one. The delay is rounded
// to the microsecond, the precision every supported database keeps.
func DefaultRetryPolicy(job *Job, failures int) (time.Duration, int) {
	if failures < 1 {
		failures = 1
	}
	secs := 60 * math.Pow(float64(failures), 1.6)
	return time.Duration(secs * float64(time.Second)).Round(time.Microsecond), job.Priority - 1
}

func (p *Plugin) retryPolicy(t *task) RetryPolicy {
	switch {
	case t != nil && t.retry != nil:
		return t.retry
	case p.RetryPolicy != nil:
		return p.RetryPolicy
	}
	return DefaultRetryPolicy
}
