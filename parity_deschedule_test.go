package async_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Point 1: Deschedule cancels the pending jobs of an identity; FlushQueue
// never runs them; jobs already done keep their state.
func TestDescheduleCancelsPendingJobsOfIdentity(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		a1 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "a"))
		a2 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "a"), async.Priority(9), async.RunAfter(d.Clock.Now().Add(-time.Hour)))
		b := mustSchedule(t, d.DB, parityRecord, async.Args(log, "b"))
		assert.Equal(t, a1.Identity, a2.Identity, "priority and run_after are not part of the identity")
		assert.NotEqual(t, a1.Identity, b.Identity)

		n, err := async.Deschedule(d.DB, parityRecord, async.Args(log, "a"))
		require.NoError(t, err)
		assert.EqualValues(t, 2, n)
		first := jobState(t, d, a1.ID).Cancelled
		require.NotNil(t, first)
		require.NotNil(t, jobState(t, d, a2.ID).Cancelled)

		// Already cancelled jobs are not matched again: count 0, time kept.
		d.Clock.Advance(time.Minute)
		n, err = async.Deschedule(d.DB, parityRecord, async.Args(log, "a"))
		require.NoError(t, err)
		assert.Zero(t, n)
		assert.True(t, first.Equal(*jobState(t, d, a1.ID).Cancelled), "a second Deschedule must not move cancelled")

		assert.Equal(t, 1, flush(t, d, async.FlushOptions{}))
		assert.Equal(t, []string{"b"}, logged(log), "cancelled jobs never run")
		assert.Nil(t, jobState(t, d, a1.ID).Executed)

		// Executed jobs are not cancelled.
		n, err = async.Deschedule(d.DB, parityRecord, async.Args(log, "b"))
		require.NoError(t, err)
		assert.Zero(t, n)
		assert.Nil(t, jobState(t, d, b.ID).Cancelled)

		// Failed jobs are not cancelled.
		f := mustSchedule(t, d.DB, parityFail, async.Args(log, "f"), async.MaxAttempts(1))
		_, err = async.FlushQueue(d.DB, async.FlushOptions{})
		require.Error(t, err)
		require.NotNil(t, jobState(t, d, f.ID).Failed)
		n, err = async.Deschedule(d.DB, parityFail, async.Args(log, "f"))
		require.NoError(t, err)
		assert.Zero(t, n)
		assert.Nil(t, jobState(t, d, f.ID).Cancelled)
	})
}

// Point 1: only the task name, Args and WithKwargs make the identity; the
// order of keyword arguments (and of keys in nested objects) does not matter.
func TestDescheduleIdentityIgnoresKwargsOrderAndOtherOptions(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		nested := map[string]any{"y": 1, "x": []any{1, "two"}}
		j1 := mustSchedule(t, d.DB, parityKw, async.Args(log), async.WithKwargs(async.Kwargs{"b": 2, "a": nested}))
		j2 := mustSchedule(t, d.DB, parityKw, async.Args(log), async.WithKwargs(async.Kwargs{"a": map[string]any{"x": []any{1, "two"}, "y": 1}}),
			async.WithKwargs(async.Kwargs{"b": 2}), async.Queue("other"), async.Priority(1))
		assert.Equal(t, j1.Identity, j2.Identity)
		assert.Len(t, j1.Identity, 40)
		assert.Equal(t, parityKwName+`("`+log+`", a={"x":[1,"two"],"y":1}, b=2)`, j1.String())

		// Different values: a different identity, nothing cancelled.
		n, err := async.Deschedule(d.DB, parityKw, async.Args(log), async.WithKwargs(async.Kwargs{"a": nested, "b": 3}))
		require.NoError(t, err)
		assert.Zero(t, n)
		// Missing keyword argument: no match either.
		n, err = async.Deschedule(d.DB, parityKw, async.Args(log), async.WithKwargs(async.Kwargs{"b": 2}))
		require.NoError(t, err)
		assert.Zero(t, n)

		// By task name, kwargs given in another order and split over
		// options, with options that are not part of the identity.
		n, err = async.Deschedule(d.DB, parityKwName, async.WithKwargs(async.Kwargs{"b": 2}), async.Args(log),
			async.WithKwargs(async.Kwargs{"a": map[string]any{"y": 1, "x": []any{1, "two"}}}),
			async.InGroup("not-a-group"), async.Priority(7), async.Queue(""), async.RunAfter(time.Now()))
		require.NoError(t, err)
		assert.EqualValues(t, 2, n)
		assert.Zero(t, count(t, d.DB, "async_group", ""), "InGroup is ignored by Deschedule")
		assert.Zero(t, flush(t, d, async.FlushOptions{}))
		assert.Empty(t, logged(log))
	})
}

// Point 1: numbers in the identity are kept as written: two integers that
// a float64 cannot tell apart are two identities, and descheduling one
// leaves the other.
func TestDescheduleIdentityKeepsNumbersAsWritten(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		key := freshLog(t)
		a := mustSchedule(t, d.DB, parityTick, async.Args(key, int64(1<<53)))
		b := mustSchedule(t, d.DB, parityTick, async.Args(key, int64(1<<53+1)))
		assert.NotEqual(t, a.Identity, b.Identity)
		assert.Equal(t, tickName+`("`+key+`", 9007199254740993)`, b.String())
		n, err := async.Deschedule(d.DB, parityTick, async.Args(key, int64(1<<53+1)))
		require.NoError(t, err)
		assert.EqualValues(t, 1, n)
		assert.True(t, jobState(t, d, a.ID).Pending())
		assert.NotNil(t, jobState(t, d, b.ID).Cancelled)
	})
}

// Point 1: Deschedule runs in the caller's transaction.
func TestDescheduleIsTransactional(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		j := mustSchedule(t, d.DB, parityRecord, async.Args(log, "x"))
		errRollback := errors.New("rollback")
		err := d.DB.Transaction(func(tx *gorm.DB) error {
			n, err := async.Deschedule(tx, parityRecord, async.Args(log, "x"))
			require.NoError(t, err)
			assert.EqualValues(t, 1, n)
			return errRollback
		})
		require.ErrorIs(t, err, errRollback)
		assert.Nil(t, jobState(t, d, j.ID).Cancelled, "a rolled-back Deschedule leaves the job pending")

		// Scheduled and descheduled in one transaction: the job is born cancelled.
		require.NoError(t, d.DB.Transaction(func(tx *gorm.DB) error {
			mustSchedule(t, tx, parityRecord, async.Args(log, "y"))
			n, err := async.Deschedule(tx, parityRecord, async.Args(log, "y"))
			assert.EqualValues(t, 1, n)
			return err
		}))
		assert.EqualValues(t, 1, count(t, d.DB, "async_job", "cancelled IS NOT NULL"))

		assert.Equal(t, 1, flush(t, d, async.FlushOptions{}))
		assert.Equal(t, []string{"x"}, logged(log))
		// Bad input.
		_, err = async.Deschedule(d.DB, nil)
		assert.ErrorIs(t, err, async.ErrNilTask)
		_, err = async.Deschedule(d.DB, parityRecord, async.Args(log))
		assert.ErrorIs(t, err, async.ErrBadArguments)
	})
}

// Point 1: a running job does not block Deschedule. On Postgres and MySQL its
// locked row is skipped (a running job cannot be cancelled and completes);
// on SQLite, a single writer, Deschedule waits for the run to end.
func TestDescheduleDoesNotWaitForRunningJob(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		key := freshLog(t)
		g := newGate(key)
		running := mustSchedule(t, d.DB, parityBlock, async.Args(key))
		queued := mustSchedule(t, d.DB, parityBlock, async.Args(key))
		type result struct {
			n   int
			err error
		}
		flushed := make(chan result, 1)
		go func() {
			n, err := async.FlushQueue(d.DB, async.FlushOptions{Jobs: 1})
			flushed <- result{n, err}
		}()
		waitStarted(t, g)

		var cancelled int64
		if d.Kind == "sqlite" {
			done := make(chan error, 1)
			go func() {
				var err error
				cancelled, err = async.Deschedule(d.DB, parityBlock, async.Args(key))
				done <- err
			}()
			close(g.release)
			require.NoError(t, <-done)
		} else {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			var err error
			cancelled, err = async.Deschedule(d.DB.WithContext(ctx), parityBlock, async.Args(key))
			require.NoError(t, err, "Deschedule must not wait for the running job")
			close(g.release)
		}
		r := <-flushed
		require.NoError(t, r.err)
		assert.Equal(t, 1, r.n)
		assert.EqualValues(t, 1, cancelled, "only the queued job is cancelled")
		got := jobState(t, d, running.ID)
		assert.NotNil(t, got.Executed, "the running job completes")
		assert.Nil(t, got.Cancelled)
		assert.NotNil(t, jobState(t, d, queued.ID).Cancelled)
	})
}

// Point 1: a job claimed by FlushQueue but not yet started is cancelled, and
// its run is skipped.
func TestDescheduleClaimedJobIsNotRun(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		g := newGate(log)
		j := mustSchedule(t, d.DB, parityRecord, async.Args(log, "claimed"))
		infos := make(chan async.RunInfo, 1)
		plugin(t, d).AfterRun = func(_ context.Context, info async.RunInfo) { infos <- info }
		type result struct {
			n   int
			err error
		}
		flushed := make(chan result, 1)
		go func() {
			// The Out line is written after the claim, before the run.
			n, err := async.FlushQueue(d.DB, async.FlushOptions{Out: &blockingWriter{g: g}})
			flushed <- result{n, err}
		}()
		waitStarted(t, g)
		assert.NotEmpty(t, jobState(t, d, j.ID).LockedBy, "the job is claimed")
		n, err := async.Deschedule(d.DB, parityRecord, async.Args(log, "claimed"))
		require.NoError(t, err)
		assert.EqualValues(t, 1, n)
		close(g.release)
		r := <-flushed
		require.NoError(t, r.err)
		assert.Zero(t, r.n)
		assert.Empty(t, logged(log), "a cancelled job does not run")
		got := jobState(t, d, j.ID)
		assert.NotNil(t, got.Cancelled)
		assert.Nil(t, got.Executed)
		info := recv(t, infos, time.Minute, "the run's report")
		assert.Equal(t, async.OutcomeSkipped, info.Outcome)
		assert.ErrorIs(t, info.Err, async.ErrLeaseLost)
	})
}

// A pending job's row locked by a claim under way (here a transaction that
// locks it and then leases it, as a claim does) is not skipped as if it were
// running: Deschedule waits for the claim to commit and cancels the job.
// Without that, Deschedule returned 0 and the job ran.
func TestDescheduleWaitsForAClaimUnderWay(t *testing.T) {
	eachServerDB(t, "on SQLite one writer at a time: no claim is under way while Deschedule writes", func(t *testing.T, d *testDB) {
		log := freshLog(t)
		j := mustSchedule(t, d.DB, parityRecord, async.Args(log, "claimed"))
		other := mustSchedule(t, d.DB, parityRecord, async.Args(log, "free"))
		claim := d.DB.Begin()
		require.NoError(t, claim.Error)
		defer claim.Rollback()
		var ids []int64
		require.NoError(t, claim.Raw("SELECT id FROM async_job WHERE id = ? FOR UPDATE", j.ID).Scan(&ids).Error)
		require.Equal(t, []int64{j.ID}, ids)

		waiting, committed := make(chan struct{}), make(chan struct{})
		var once sync.Once
		defer async.SetDescheduleWaitHook(func() { once.Do(func() { close(waiting); <-committed }) })()
		type result struct {
			n   int64
			err error
		}
		done := make(chan result, 1)
		go func() {
			n, err := async.Deschedule(d.DB, parityRecord, async.Args(log, "claimed"))
			done <- result{n, err}
		}()
		recv(t, waiting, time.Minute, "Deschedule to find the claimed row held")
		require.NoError(t, claim.Exec("UPDATE async_job SET locked_by = 'claimer', locked_until = ?, attempts = attempts + 1 WHERE id = ?",
			time.Now().Add(time.Hour), j.ID).Error)
		require.NoError(t, claim.Commit().Error)
		close(committed)
		r := recv(t, done, time.Minute, "Deschedule to return")
		require.NoError(t, r.err)
		assert.EqualValues(t, 1, r.n)
		assert.NotNil(t, jobState(t, d, j.ID).Cancelled, "the job the claim held is cancelled")
		assert.Nil(t, jobState(t, d, other.ID).Cancelled, "another identity is untouched")
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{}))
		assert.Equal(t, []string{"free"}, logged(log), "the cancelled job never runs")
	})
}
