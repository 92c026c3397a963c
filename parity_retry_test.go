package async_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// parityFailCustom fails; it is registered with its own retry policy.
func parityFailCustom(ctx context.Context, tx *gorm.DB, label string) error {
	return errors.New("custom failure " + label)
}

// customRetry is parityFailCustom's policy: 42 s per failure, priority 0.
func customRetry(job *async.Job, failures int) (time.Duration, int) {
	return time.Duration(failures) * 42 * time.Second, 0
}

func init() {
	if err := async.RegisterAs("parity.fail.custom", parityFailCustom, async.WithRetryPolicy(customRetry)); err != nil {
		panic(err)
	}
}

// failAndCheck runs the job once through FlushQueue (it must fail) and checks
// its new schedule and priority.
func failAndCheck(t *testing.T, d *testDB, id int64, filter string, delay time.Duration, prio int) {
	t.Helper()
	_, err := async.FlushQueue(d.DB, async.FlushOptions{Filter: filter})
	require.Error(t, err)
	got := jobState(t, d, id)
	require.NotNil(t, got.Scheduled)
	assert.True(t, frozenNow(d).Add(delay).Equal(*got.Scheduled), "scheduled %v, want now + %v", got.Scheduled, delay)
	assert.Equal(t, prio, got.Priority)
	assert.Nil(t, got.Executed)
	assert.Nil(t, got.Failed)
}

// Point 7: the default policy waits 60·n^1.6 s after the n-th failure and
// lowers the priority by one each time.
func TestRetryDefaultPolicy(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		freezeClock(d)
		j := mustSchedule(t, d.DB, parityFail, async.Args(log, "x"), async.MaxAttempts(0))
		for n := 1; n <= 5; n++ {
			failAndCheck(t, d, j.ID, failName, backoff(n).Round(time.Microsecond), 5-n)
			assert.EqualValues(t, n, count(t, d.DB, "async_error", "job_id = ?", j.ID))
			// Not due a microsecond before its time; due at it.
			d.Clock.Advance(backoff(n).Round(time.Microsecond) - time.Microsecond)
			assert.Zero(t, flush(t, d, async.FlushOptions{Filter: failName}))
			d.Clock.Advance(time.Microsecond)
		}
		assert.InDelta(t, 788.0, backoff(5).Seconds(), 0.1, "the reference's table: n=5 waits 788.0 s")
		assert.Len(t, logged(log), 5)
	})
}

// Point 7: Plugin.RetryPolicy replaces the default; a task's own
// WithRetryPolicy wins over the plugin's.
func TestRetryPluginAndTaskPolicies(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		freezeClock(d)
		plugin(t, d).RetryPolicy = func(job *async.Job, failures int) (time.Duration, int) {
			return time.Duration(failures) * time.Hour, job.Priority + 10
		}
		j := mustSchedule(t, d.DB, parityFail, async.Args(log, "plugin"))
		failAndCheck(t, d, j.ID, failName, time.Hour, 15)
		d.Clock.Advance(time.Hour)
		failAndCheck(t, d, j.ID, failName, 2*time.Hour, 25)

		c := mustSchedule(t, d.DB, "parity.fail.custom", async.Args("task"), async.Priority(7))
		failAndCheck(t, d, c.ID, "parity.fail.custom", 42*time.Second, 0)
		d.Clock.Advance(42 * time.Second)
		failAndCheck(t, d, c.ID, "parity.fail.custom", 84*time.Second, 0)
		var e async.JobError
		require.NoError(t, d.DB.Where("job_id = ?", c.ID).Order("id").First(&e).Error)
		assert.Contains(t, e.Exception, "custom failure task")
	})
}
