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

const removeOldJobsName = "github.com/gormasync/async.RemoveOldJobs"

func exists(t testing.TB, d *testDB, id int64) bool {
	t.Helper()
	return count(t, d.DB, "async_job", "id = ?", id) == 1
}

// Point 4: RemoveOldJobs, run as a job, removes jobs executed, cancelled or
// failed strictly before the cutoff (exactly at it is kept), with their
// errors; a group only when all its jobs qualify; never pending jobs. It
// reschedules itself after hours.
func TestRemoveOldJobsCutoffsGroupsAndRescheduling(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		freezeClock(d)
		// At t0: one job of each done state, plus pending ones.
		eOld := mustSchedule(t, d.DB, parityRecord, async.Args(log, "eOld"))
		cOld := mustSchedule(t, d.DB, parityRecord, async.Args(log, "cOld"))
		fOld := mustSchedule(t, d.DB, parityFail, async.Args(log, "fOld"), async.MaxAttempts(1))
		rOld := mustSchedule(t, d.DB, parityFail, async.Args(log, "rOld"), async.MaxAttempts(5))
		pOld := mustSchedule(t, d.DB, parityRecord, async.Args(log, "pOld"))
		gAll1 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "gAll1"), async.InGroup("all-old"))
		gAll2 := mustSchedule(t, d.DB, parityFail, async.Args(log, "gAll2"), async.InGroup("all-old"), async.MaxAttempts(1))
		gMix1 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "gMix1"), async.InGroup("mixed"))
		gMix2 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "gMix2"), async.InGroup("mixed"))
		gPen1 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "gPen1"), async.InGroup("pending"))
		gPen2 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "gPen2"), async.InGroup("pending"), async.RunAfter(frozenNow(d).Add(365*24*time.Hour)))
		require.NoError(t, eOld.Execute(d.DB))
		_, err := async.Deschedule(d.DB, parityRecord, async.Args(log, "cOld"))
		require.NoError(t, err)
		require.Error(t, fOld.Execute(d.DB))
		require.Error(t, rOld.Execute(d.DB))
		require.NoError(t, gAll1.Execute(d.DB))
		require.Error(t, gAll2.Execute(d.DB))
		require.NoError(t, gMix1.Execute(d.DB))
		require.NoError(t, gPen1.Execute(d.DB))
		// One microsecond later: jobs that will sit exactly at the cutoff.
		d.Clock.Advance(time.Microsecond)
		eEdge := mustSchedule(t, d.DB, parityRecord, async.Args(log, "eEdge"))
		require.NoError(t, eEdge.Execute(d.DB))
		require.NoError(t, gMix2.Execute(d.DB))
		assert.EqualValues(t, 3, count(t, d.DB, "async_error", ""), "fOld, rOld and gAll2 failed once")

		// Thirty days after t1: the cutoff is t1 exactly.
		d.Clock.Advance(30 * 24 * time.Hour)
		cleanup := mustSchedule(t, d.DB, async.RemoveOldJobs, async.Args(30, 8))
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{Filter: removeOldJobsName}))
		assert.NotNil(t, jobState(t, d, cleanup.ID).Executed)

		for _, j := range []*async.Job{eOld, cOld, fOld, gAll1, gAll2} {
			assert.False(t, exists(t, d, j.ID), "job %s done before the cutoff is removed", j)
		}
		for _, j := range []*async.Job{rOld, pOld, eEdge, gMix1, gMix2, gPen1, gPen2} {
			assert.True(t, exists(t, d, j.ID), "job %s is kept", j)
		}
		assert.EqualValues(t, 0, count(t, d.DB, "async_error", "job_id IN ?", []int64{fOld.ID, gAll2.ID}), "errors go with their jobs")
		assert.EqualValues(t, 1, count(t, d.DB, "async_error", "job_id = ?", rOld.ID), "a pending job keeps its errors")
		assert.Zero(t, count(t, d.DB, "async_group", "reference = ?", "all-old"), "a group all of whose jobs are old goes")
		assert.EqualValues(t, 1, count(t, d.DB, "async_group", "reference = ?", "mixed"), "a group with a job at the cutoff stays")
		assert.EqualValues(t, 1, count(t, d.DB, "async_group", "reference = ?", "pending"), "a group with a pending job stays")

		// It rescheduled itself, 8 hours on, with the same arguments.
		var next []async.Job
		require.NoError(t, d.DB.Where("name = ? AND executed IS NULL", removeOldJobsName).Find(&next).Error)
		require.Len(t, next, 1)
		assert.JSONEq(t, `[30, 8]`, next[0].Args)
		require.NotNil(t, next[0].Scheduled)
		assert.True(t, frozenNow(d).Add(8*time.Hour).Equal(*next[0].Scheduled), "scheduled %v", next[0].Scheduled)
		assert.Zero(t, flush(t, d, async.FlushOptions{Filter: removeOldJobsName}), "not due before 8 hours")

		d.Clock.Advance(8 * time.Hour)
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{Filter: removeOldJobsName}))
		for _, j := range []*async.Job{eEdge, gMix1, gMix2} {
			assert.False(t, exists(t, d, j.ID), "job %s is now old", j)
		}
		assert.Zero(t, count(t, d.DB, "async_group", "reference = ?", "mixed"))
		for _, j := range []*async.Job{rOld, pOld, gPen1, gPen2, cleanup} {
			assert.True(t, exists(t, d, j.ID), "job %s is kept", j)
		}
		assert.EqualValues(t, 1, count(t, d.DB, "async_job", "name = ? AND executed IS NULL", removeOldJobsName))
		assert.EqualValues(t, 2, count(t, d.DB, "async_job", "name = ? AND executed IS NOT NULL", removeOldJobsName))
	})
}

// Point 4: everything RemoveOldJobs does is in its transaction; bad
// arguments fail the job at once.
func TestRemoveOldJobsIsTransactional(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		freezeClock(d)
		old := mustSchedule(t, d.DB, parityRecord, async.Args(log, "old"))
		require.NoError(t, old.Execute(d.DB))
		d.Clock.Advance(2 * 24 * time.Hour)

		errRollback := errors.New("rollback")
		err := d.DB.Transaction(func(tx *gorm.DB) error {
			require.NoError(t, async.RemoveOldJobs(context.Background(), tx, 1, 8))
			assert.Zero(t, count(t, tx, "async_job", "id = ?", old.ID), "removed inside the transaction")
			return errRollback
		})
		require.ErrorIs(t, err, errRollback)
		assert.True(t, exists(t, d, old.ID), "the rollback undoes the removal")
		assert.Zero(t, count(t, d.DB, "async_job", "name = ?", removeOldJobsName), "and the rescheduling")

		bad := mustSchedule(t, d.DB, async.RemoveOldJobs, async.Args(1, 0))
		_, err = async.FlushQueue(d.DB, async.FlushOptions{Filter: removeOldJobsName})
		require.ErrorIs(t, err, async.ErrBadArguments)
		assert.NotNil(t, jobState(t, d, bad.ID).Failed, "bad arguments fail at once, without retries")
		assert.True(t, exists(t, d, old.ID))
		assert.EqualValues(t, 1, count(t, d.DB, "async_job", "name = ?", removeOldJobsName))
	})
}
