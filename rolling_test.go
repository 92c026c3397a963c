package async_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Rolling deploy: a new version registers a task that the processes of
// the old one do not. A job of that task that an old process claims did
// not run: it is put off by the retry delay with the error recorded, its
// attempt given back and its priority kept, so that the new version runs
// it later however few attempts it has. It used to count as a failed run:
// a job with MaxAttempts(1) ended failed at once, without a run, and the
// others lost attempts and priority to every old process that claimed them.
func TestJobOfTaskUnknownToItsProcessIsPutOffNotFailed(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		name := "rolling.NewTask/" + newKey(t, "task")
		key := newKey(t, "job")
		job, err := async.Schedule(d.DB, name, async.Args(key), async.MaxAttempts(1), async.Priority(7))
		require.NoError(t, err)

		// A process of the old version claims it, twice.
		for range 2 {
			_, err = async.FlushQueue(d.DB, async.FlushOptions{})
			require.ErrorIs(t, err, async.ErrUnknownTask)
			got := getJob(t, d.DB, job.ID)
			require.True(t, got.Pending(), "the job is still pending")
			assert.Zero(t, got.Attempts, "no attempt counted")
			assert.Equal(t, 7, got.Priority, "priority kept")
			assert.Empty(t, got.LockedBy)
			require.NotNil(t, got.Scheduled)
			assert.True(t, got.Scheduled.After(d.Clock.Now().Add(30*time.Second)), "put off")
			d.Clock.Advance(time.Hour) // past the retry delay
		}
		var errs []async.JobError
		require.NoError(t, d.DB.Where("job_id = ?", job.ID).Find(&errs).Error)
		require.Len(t, errs, 2, "each claim recorded")
		assert.Contains(t, errs[0].Exception, async.ErrUnknownTask.Error())

		// The new version registers it and runs it.
		require.NoError(t, async.RegisterAs(name, func(ctx context.Context, tx *gorm.DB, k string) error {
			return tx.Create(&Effect{K: k}).Error
		}))
		n, err := async.FlushQueue(d.DB, async.FlushOptions{})
		require.NoError(t, err)
		assert.Equal(t, 1, n)
		got := getJob(t, d.DB, job.ID)
		require.NotNil(t, got.Executed)
		assert.Equal(t, 1, got.Attempts)
		assert.EqualValues(t, 1, effects(t, d.DB, key))
	})
}
