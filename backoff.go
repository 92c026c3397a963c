package async

import (
	"math/rand/v2"
	"time"
)

// Timing helpers of the worker: timer resets, poll jitter and retry backoff.

func resetTimer(t *time.Timer, d time.Duration) {
	t.Stop()
	select {
	case <-t.C:
	default:
	}
	t.Reset(d)
}

// jitter spreads d by ±20% so that idle workers do not poll in step.
func jitter(d time.Duration) time.Duration {
	return d + time.Duration((rand.Float64()*0.4-0.2)*float64(d))
}

// backoff is an exponential delay from 100ms to 30s, with jitter.
type backoff struct{ d time.Duration }

func newBackoff() *backoff { return &backoff{} }

func (b *backoff) reset() { b.d = 0 }

func (b *backoff) next() time.Duration {
	switch {
	case b.d == 0:
		b.d = 100 * time.Millisecond
	case b.d < 30*time.Second:
		b.d = min(2*b.d, 30*time.Second)
	}
	return jitter(b.d)
}
