package async

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// Prefetch keeps ready about what the slots run in prefetchSpan, within
// the option's bound, and at least one job.
func TestReadyLimit(t *testing.T) {
	assert.Equal(t, 32, readyLimit(32, 1, 0), "no run time known yet: the bound")
	assert.Equal(t, 20, readyLimit(32, 1, time.Millisecond), "20ms of 1ms jobs on one slot")
	assert.Equal(t, 32, readyLimit(32, 1, 100*time.Microsecond), "the bound")
	assert.Equal(t, 40, readyLimit(64, 4, 2*time.Millisecond), "4 slots, 2ms jobs")
	assert.Equal(t, 2, readyLimit(32, 1, 9*time.Millisecond), "20ms of 9ms jobs")
	assert.Equal(t, 1, readyLimit(32, 1, 30*time.Millisecond), "at least one")
}
