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

// Group commit sizes a batch to what starts within the window at the pace
// its recent batches ran, rounded down to one of fitSizes.
func TestBatchFit(t *testing.T) {
	w := 50 * time.Millisecond
	assert.Equal(t, 256, batchFit(256, w, 0), "no pace known yet: BatchSize")
	assert.Equal(t, 256, batchFit(256, w, 100*time.Microsecond), "501 fit: BatchSize")
	assert.Equal(t, 128, batchFit(256, w, 350*time.Microsecond), "143 fit")
	assert.Equal(t, 96, batchFit(256, w, 500*time.Microsecond), "101 fit")
	assert.Equal(t, 2, batchFit(256, w, 30*time.Millisecond), "the second starts at 30ms, inside the window")
	assert.Equal(t, 1, batchFit(256, w, 80*time.Millisecond), "one job longer than the window")
	assert.Equal(t, 1, batchFit(1, w, time.Microsecond), "strict mode")
	assert.Equal(t, 8, batchFit(8, 0, time.Second), "no window")
}

// A batch's pace: the mean time between its jobs' starts; with one job, the
// batch's time; jobs given back unstarted do not count.
func TestDoneReportPace(t *testing.T) {
	t0 := time.Now().Add(-time.Second)
	infos := []RunInfo{
		{Outcome: OutcomeExecuted, Started: t0},
		{Outcome: OutcomeExecuted, Started: t0.Add(10 * time.Millisecond)},
		{Outcome: OutcomeRetry, Started: t0.Add(30 * time.Millisecond)},
		{}, {}, // given back unstarted
	}
	r := doneReport(infos, t0)
	assert.Equal(t, 3, r.jobs)
	assert.Equal(t, 15*time.Millisecond, r.pace)
	assert.GreaterOrEqual(t, r.took, time.Second)

	r = doneReport(infos[:1], t0)
	assert.Equal(t, 1, r.jobs)
	assert.Equal(t, r.took, r.pace, "one job: the batch's time")

	r = doneReport(infos[3:], t0)
	assert.Zero(t, r.jobs)
	assert.Zero(t, r.pace)
}
