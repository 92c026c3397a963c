package async_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// What a run leaves when its transaction is rolled back, or when its job
// was cancelled meanwhile: the job as it was claimed, given back or left
// cancelled, and failures charged to the job that caused them.

// Group commit's careful path completes jobs one by one in a shared
// transaction; when that transaction is then rolled back (here at shutdown),
// every job completed in it goes back to the queue as it was claimed, its
// attempt uncounted, not just the job that was running.
func TestSharedTransactionRollbackReleasesJobsCompletedInIt(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		ka, kb, kc, kd := newKey(t, "a"), newKey(t, "b"), newKey(t, "c"), newKey(t, "d")
		started := make(chan int64, 10)
		on(t, kb, func(ctx context.Context, run int64) error {
			if run == 1 {
				return nil // the optimistic pass
			}
			started <- run // the careful pass, after c failed: block until shutdown
			<-ctx.Done()
			return ctx.Err()
		})
		on(t, kc, func(ctx context.Context, run int64) error { return errors.New("c fails") })
		a := scheduleCtl(t, d.DB, ka)
		b := scheduleCtl(t, d.DB, kb)
		scheduleCtl(t, d.DB, kc)
		scheduleCtl(t, d.DB, kd)
		stop := startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, BatchSize: 4, BatchWindow: time.Minute,
			ShutdownTimeout: 200 * time.Millisecond, Lease: time.Hour, PollInterval: 20 * time.Millisecond})
		recv(t, started, time.Minute, "b's careful run to start")
		stop()

		for _, j := range []*async.Job{getJob(t, d.DB, a.ID), getJob(t, d.DB, b.ID)} {
			assert.True(t, j.Pending(), "job %d: its completion was rolled back", j.ID)
			assert.Equal(t, "", j.LockedBy, "job %d released", j.ID)
			assert.Nil(t, j.LockedUntil, "job %d not leased", j.ID)
			assert.Equal(t, 0, j.Attempts, "job %d: attempt uncounted", j.ID)
		}
		assert.Zero(t, effects(t, d.DB, ka), "a's write rolled back with its completion")
		assert.Zero(t, effects(t, d.DB, kb))
	})
}

// A job cancelled while its run goes on (group commit does not lock a
// batch's rows) stays cancelled when the run then fails: it is not also
// marked failed or rescheduled, and it gets no error row.
func TestFailureOfCancelledJobLeavesItCancelled(t *testing.T) {
	eachServerDB(t, "Deschedule must commit while a group-commit batch runs", func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		kx, ky := newKey(t, "x"), newKey(t, "y")
		descheduleOnFirstRun(t, d, kx, async.Permanent(errors.New("x fails for good")))
		x := scheduleCtl(t, d.DB, kx)
		scheduleCtl(t, d.DB, ky)
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, BatchSize: 2, BatchWindow: time.Minute, PollInterval: 20 * time.Millisecond})
		// y runs after x's failure is handled, in the same slot.
		waitFor(t, 30*time.Second, "y to run", func() bool { return effects(t, d.DB, ky) == 1 })

		gx := getJob(t, d.DB, x.ID)
		require.NotNil(t, gx.Cancelled, "x was descheduled")
		assert.Nil(t, gx.Failed, "a cancelled job is not also failed")
		assert.Equal(t, 5, gx.Priority, "nor rescheduled")
		assert.Zero(t, count(t, d.DB, "async_error", "job_id = ?", x.ID), "no error row for a cancelled job")
		assert.Zero(t, effects(t, d.DB, kx))
		assertEachJobInOneState(t, d.DB)
	})
}

// A job cancelled while its group-commit batch runs, whose task then
// succeeds, is not completed with the batch: it stays cancelled, its task's
// writes do not commit, and the batch's other jobs complete.
func TestCancelledJobInASucceedingBatchStaysCancelled(t *testing.T) {
	eachServerDB(t, "Deschedule must commit while a group-commit batch runs", func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		kx, ky := newKey(t, "x"), newKey(t, "y")
		descheduleOnFirstRun(t, d, kx, nil)
		x := scheduleCtl(t, d.DB, kx)
		y := scheduleCtl(t, d.DB, ky)
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, BatchSize: 2, BatchWindow: time.Minute, PollInterval: 20 * time.Millisecond})
		waitJob(t, d.DB, y.ID, 30*time.Second, "y executed", executed)

		gx := getJob(t, d.DB, x.ID)
		require.NotNil(t, gx.Cancelled, "x was descheduled")
		assert.Nil(t, gx.Executed, "a cancelled job is not also executed")
		assert.Zero(t, effects(t, d.DB, kx), "its task's writes did not commit")
		assert.EqualValues(t, 1, effects(t, d.DB, ky))
		assertEachJobInOneState(t, d.DB)
	})
}

// A group-commit batch does not lock its rows: a task that outlives its
// lease may see its job claimed again, here by a claim of the same worker
// id (the worker itself, from another slot). The batch's completion
// re-checks each claim's attempt as well as its owner: the stale run does
// not complete the job, its writes do not commit, and the claim that holds
// the job keeps it. The batch's other job completes.
func TestBatchDoesNotCompleteAJobClaimedAgainMeanwhile(t *testing.T) {
	eachServerDB(t, "a claim must commit while a group-commit batch runs", func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		other := secondHandle(t, d, d.DSN, nil)
		kx, ky := newKey(t, "x"), newKey(t, "y")
		started, release := make(chan int64, 1), make(chan struct{})
		on(t, kx, blockUntil(started, release))
		x := scheduleCtl(t, d.DB, kx)
		y := scheduleCtl(t, d.DB, ky)
		startWorker(t, d.DB, async.WorkerOptions{ID: "w", Concurrency: 1, BatchSize: 2, BatchWindow: time.Minute,
			Lease: time.Minute, PollInterval: 20 * time.Millisecond})
		recv(t, started, 30*time.Second, "x's run")
		d.Clock.Advance(2 * time.Minute) // x's lease ran out
		again, err := async.ClaimForTest(other, "w", 1)
		require.NoError(t, err)
		require.Len(t, again, 1)
		require.Equal(t, x.ID, again[0].ID)
		require.Equal(t, 2, again[0].Attempts)
		close(release)
		waitJob(t, d.DB, y.ID, 30*time.Second, "y executed", executed)

		gx := getJob(t, d.DB, x.ID)
		assert.Nil(t, gx.Executed, "the stale run did not complete x")
		assert.Zero(t, effects(t, d.DB, kx), "nor did its writes commit")
		assert.Equal(t, "w", gx.LockedBy, "the claim that holds x keeps it")
		assert.Equal(t, 2, gx.Attempts)
		assert.EqualValues(t, 1, effects(t, d.DB, ky))
	})
}

// On Postgres a task that ignores a failed statement's error leaves its
// transaction aborted. In a group-commit batch the next task's statements
// then fail too; the failure is charged to the job that caused it, and the
// next job runs and succeeds. The batch's careful pass, which finds the
// culprit, keeps the jobs it completed before it: w runs twice (the
// optimistic pass, the careful one), not a third time.
func TestGroupCommitChargesTheJobThatAbortedTheTransaction(t *testing.T) {
	d := newTestDB(t, "postgres", nil)
	migrateApp(t, d)
	kw, ky := newKey(t, "w"), newKey(t, "y")
	w := scheduleCtl(t, d.DB, kw)
	x, err := async.Schedule(d.DB, swallowsFailedStatement, async.Args(newKey(t, "x")), async.MaxAttempts(1))
	require.NoError(t, err)
	y := scheduleCtl(t, d.DB, ky, async.MaxAttempts(1))
	startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, BatchSize: 3, BatchWindow: time.Minute, PollInterval: 20 * time.Millisecond})
	waitJob(t, d.DB, y.ID, 30*time.Second, "y executed", executed)

	assert.Zero(t, count(t, d.DB, "async_error", "job_id = ?", y.ID), "y did nothing wrong")
	assert.EqualValues(t, 1, effects(t, d.DB, ky))
	assert.NotNil(t, getJob(t, d.DB, w.ID).Executed)
	assert.EqualValues(t, 1, effects(t, d.DB, kw))
	assert.EqualValues(t, 2, runCount(kw), "w completed in the careful pass, before x")
	gx := getJob(t, d.DB, x.ID)
	require.NotNil(t, gx.Failed, "x, which broke the transaction, ends failed (one attempt)")
	var e async.JobError
	require.NoError(t, d.DB.Where("job_id = ?", x.ID).Take(&e).Error)
	assert.Contains(t, e.Exception, "25P02", "x's error is the aborted transaction its task left")
}

// OnCompletion on a plain handle commits the job and its place as the
// group's final job together: a flush_queue that runs between its
// statements does not find it as an ordinary member of the group.
func TestOnCompletionOnPlainHandleIsOneTransaction(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		other := secondHandle(t, d, d.DSN, nil) // another process's flush_queue
		ka, kf := newKey(t, "member"), newKey(t, "final")
		scheduleCtl(t, d.DB, ka, async.InGroup("g1"), async.RunAfter(d.Clock.Now().Add(time.Hour)))
		flushed := make(chan error, 1)
		fired := false
		// Before the statement that makes the job the group's final job.
		require.NoError(t, d.DB.Callback().Update().Before("gorm:update").Register("test:flush_between", func(tx *gorm.DB) {
			if tx.Statement.Table != "async_group" || fired {
				return
			}
			fired = true
			go func() { _, err := async.FlushQueue(other, async.FlushOptions{}); flushed <- err }()
			if d.Kind != "sqlite" {
				// A server: the flush waits for nothing.
				require.NoError(t, <-flushed)
			} // SQLite: the flush waits for the write lock this transaction holds.
		}))
		final, err := async.OnCompletion(d.DB, "g1", ctlTask, async.Args(kf))
		require.NoError(t, err)
		require.True(t, fired)
		if d.Kind == "sqlite" {
			require.NoError(t, recv(t, flushed, time.Minute, "the flush"))
		}
		assert.Zero(t, effects(t, d.DB, kf), "the final job did not run while its group's other job is pending")
		assert.Zero(t, effects(t, d.DB, ka))
		assert.True(t, getJob(t, d.DB, final.ID).Pending())
	})
}

// A failed run's new schedule, as the job handed to AfterRun holds it, is
// the one stored: a retry policy's delay finer than the microsecond that
// the databases keep is cut to it, as the run's other times are.
func TestFailureScheduleIsTheStoredOne(t *testing.T) {
	for _, kind := range dbKinds {
		t.Run(kind, func(t *testing.T) {
			infos := make(chan async.RunInfo, 4)
			d := newTestDB(t, kind, &async.Plugin{
				RetryPolicy: func(j *async.Job, n int) (time.Duration, int) { return time.Hour + 1500*time.Nanosecond, j.Priority },
				AfterRun:    func(_ context.Context, info async.RunInfo) { infos <- info },
			})
			migrateApp(t, d)
			key := newKey(t, "fails")
			on(t, key, func(ctx context.Context, run int64) error { return errors.New("fails") })
			job := scheduleCtl(t, d.DB, key)
			_, err := async.FlushQueue(d.DB, async.FlushOptions{})
			require.Error(t, err)
			info := recv(t, infos, time.Minute, "the failed run")
			require.Equal(t, async.OutcomeRetry, info.Outcome)
			stored := getJob(t, d.DB, job.ID)
			require.NotNil(t, stored.Scheduled)
			require.NotNil(t, info.Job.Scheduled)
			assert.True(t, info.Job.Scheduled.Equal(*stored.Scheduled), "reported %s, stored %s", info.Job.Scheduled, stored.Scheduled)
		})
	}
}

// deadlockPlan steers deadlockIgnored: it reports holding its first row
// lock, waits for proceed, and reports the error of the statement that
// deadlocks, which it does not return.
type deadlockPlan struct {
	holding, proceed chan struct{}
	err              chan error
}

var deadlockPlans sync.Map // key -> *deadlockPlan

func deadlockIgnored(ctx context.Context, tx *gorm.DB, key string) error {
	v, _ := deadlockPlans.Load(key)
	plan := v.(*deadlockPlan)
	if err := tx.Create(&Effect{K: key + "/before"}).Error; err != nil {
		return err
	}
	if err := tx.Exec("UPDATE dl_rows SET v = v + 1 WHERE id = 1").Error; err != nil {
		return err
	}
	close(plan.holding)
	<-plan.proceed
	plan.err <- tx.Exec("UPDATE dl_rows SET v = v + 1 WHERE id = 2").Error // not returned
	return tx.Create(&Effect{K: key + "/after"}).Error
}

func init() { async.MustRegister(deadlockIgnored) }

// MySQL/MariaDB: a deadlock rolls back the job's whole transaction, and
// the session then runs each statement on its own. A task that does not
// return the deadlock's error does not get its job completed without its
// earlier writes: the run saw the error go by, fails the job instead of
// completing it, and the job runs again. (The task's statements after the
// deadlock committed on their own, beyond the library's reach.) Postgres
// needs nothing of the kind: the deadlock aborts the transaction, and the
// completion fails.
func TestCompletionAfterAnIgnoredDeadlockFails(t *testing.T) {
	d := newTestDB(t, "mysql", nil)
	migrateApp(t, d)
	require.NoError(t, d.DB.Exec("CREATE TABLE dl_rows (id INT PRIMARY KEY, v INT NOT NULL)").Error)
	for i := 1; i <= 25; i++ {
		require.NoError(t, d.DB.Exec("INSERT INTO dl_rows VALUES (?, 0)", i).Error)
	}
	key := newKey(t, "deadlock")
	plan := &deadlockPlan{holding: make(chan struct{}), proceed: make(chan struct{}), err: make(chan error, 1)}
	deadlockPlans.Store(key, plan)
	t.Cleanup(func() { deadlockPlans.Delete(key) })
	job, err := async.Schedule(d.DB, deadlockIgnored, async.Args(key))
	require.NoError(t, err)
	startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, PollInterval: 20 * time.Millisecond})
	recv(t, plan.holding, time.Minute, "the task to hold row 1")
	// Another transaction, heavier than the job's (InnoDB rolls back the
	// lighter one), takes rows 2-25 and then asks for row 1: a deadlock.
	other := d.DB.Begin()
	require.NoError(t, other.Exec("UPDATE dl_rows SET v = v + 1 WHERE id >= 2").Error)
	close(plan.proceed)
	require.NoError(t, other.Exec("UPDATE dl_rows SET v = v + 1 WHERE id = 1").Error)
	require.NoError(t, other.Rollback().Error)
	deadlockErr := recv(t, plan.err, time.Minute, "the task's deadlocked statement")
	require.ErrorContains(t, deadlockErr, "1213", "the job's transaction was the deadlock's victim")

	got := waitJob(t, d.DB, job.ID, time.Minute, "the failure recorded", func(j *async.Job) bool { return j.Scheduled != nil })
	assert.Nil(t, got.Executed, "not completed")
	assert.Zero(t, effects(t, d.DB, key+"/before"), "the write before the deadlock was rolled back with it")
	var e async.JobError
	require.NoError(t, d.DB.Where("job_id = ?", job.ID).Take(&e).Error)
	assert.Contains(t, e.Exception, "rolled back the job's transaction")
}

// A claim that takes a job whose attempts ran out (its last run was lost)
// and cannot end it failed, because recording that fails, still runs the
// jobs it claimed with it: they are not left leased until the lease ends,
// their attempt counted.
func TestClaimKeepsItsJobsWhenEndingExhaustedOnesFails(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		lostKey, okKey := newKey(t, "lost"), newKey(t, "ok")
		lost := scheduleCtl(t, d.DB, lostKey, async.MaxAttempts(1), async.Priority(9))
		ok := scheduleCtl(t, d.DB, okKey)
		// Its one run was lost: the attempt counted, the lease run out.
		require.NoError(t, d.DB.Model(&async.Job{}).Where("id = ?", lost.ID).
			Updates(map[string]any{"attempts": 1, "locked_by": "dead-worker", "locked_until": d.Clock.Now().Add(-time.Minute)}).Error)
		// Recording the exhausted job's failure fails.
		require.NoError(t, d.DB.Callback().Create().Before("gorm:create").Register("test:fail_error_rows", func(tx *gorm.DB) {
			if tx.Statement.Table == "async_error" {
				_ = tx.AddError(errors.New("error rows refused"))
			}
		}))
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 2, Lease: time.Hour, PollInterval: 20 * time.Millisecond})
		waitJob(t, d.DB, ok.ID, 30*time.Second, "the job claimed with the exhausted one", executed)
		assert.EqualValues(t, 1, effects(t, d.DB, okKey))
		got := getJob(t, d.DB, lost.ID)
		assert.Nil(t, got.Failed, "not ended: its error row was refused")
		assert.Zero(t, effects(t, d.DB, lostKey), "never run again")
	})
}

// A run whose COMMIT took effect but whose outcome could not be read (its
// connection died after the COMMIT, as when MariaDB's compound statement
// carrying it and the next run's start fails) goes to the failure path; it
// is reported executed there, not skipped with an error, when the job is
// executed by the run itself: its attempt and the start its completion
// wrote. A job executed by another run is still skipped, and so is a run
// whose transaction was rolled back.
func TestCommitThatTookEffectIsReportedExecuted(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		job := scheduleCtl(t, d.DB, newKey(t, "committed"))
		now := d.Clock.Now().UTC().Truncate(time.Microsecond)
		require.NoError(t, d.DB.Model(&async.Job{}).Where("id = ?", job.ID).
			Updates(map[string]any{"attempts": 1, "executed": now, "started": now}).Error)
		lostConn := errors.New("invalid connection")

		run := *job
		run.Attempts, run.LockedBy = 1, "this-run"
		out, err := async.AfterBrokenTxForTest(d.DB, &run, lostConn, &now)
		assert.Equal(t, async.OutcomeExecuted, out)
		assert.NoError(t, err)
		assert.NotNil(t, run.Executed)

		for what, c := range map[string]struct {
			attempts int
			wrote    *time.Time
		}{
			"a later attempt":                     {2, &now},
			"the same attempt, another start":     {1, new(now.Add(-time.Second))},
			"a run whose transaction rolled back": {1, nil},
		} {
			other := *job
			other.Attempts, other.LockedBy = c.attempts, "another-run"
			out, err = async.AfterBrokenTxForTest(d.DB, &other, lostConn, c.wrote)
			assert.Equal(t, async.OutcomeSkipped, out, what)
			assert.ErrorIs(t, err, lostConn, what)
		}
		assert.Zero(t, count(t, d.DB, "async_error", ""), "no failure recorded")
	})
}

// ctlNoWrite does what the test registered for key with on(), writing
// nothing: two runs of its job may overlap without one waiting for the
// other's row.
func ctlNoWrite(ctx context.Context, tx *gorm.DB, key string) error {
	n := incRun(key)
	if b, ok := behaviours.Load(key); ok {
		return b.(behaviour)(ctx, n)
	}
	return nil
}

func init() { async.MustRegister(ctlNoWrite) }

// A run whose task failed is not reported executed because another run,
// later, executed the job with the same attempt number: Retry resets the
// count (as a release uncounts an attempt), so an attempt number does not
// identify a run. Here x's first run, in a group-commit batch (whose rows
// are not locked), sees x cancelled, retried and executed by Job.Execute
// (attempt 1 again), then fails: AfterRun must see one executed run of x,
// Execute's, and the failing one skipped. Found by TestStress.
func TestFailedRunIsNotReportedExecutedByAnotherRunsCommit(t *testing.T) {
	t.Log("Postgres and MySQL only: the batch's run goes on while other connections change its job")
	for _, kind := range []string{"postgres", "mysql"} {
		t.Run(kind, func(t *testing.T) {
			var mu sync.Mutex
			var outcomes []async.Outcome
			var xID atomic.Int64
			d := newTestDB(t, kind, &async.Plugin{AfterRun: func(_ context.Context, info async.RunInfo) {
				if info.Job.ID == xID.Load() {
					mu.Lock()
					outcomes = append(outcomes, info.Outcome)
					mu.Unlock()
				}
			}})
			kx, ky := newKey(t, "x"), newKey(t, "y")
			x, err := async.Schedule(d.DB, ctlNoWrite, async.Args(kx), async.Priority(9))
			require.NoError(t, err)
			xID.Store(x.ID)
			_, err = async.Schedule(d.DB, ctlNoWrite, async.Args(ky))
			require.NoError(t, err)
			executedByOther := make(chan struct{})
			on(t, kx, func(ctx context.Context, run int64) error {
				if run != 1 {
					return nil // Execute's run
				}
				defer close(executedByOther)
				n, err := async.Deschedule(d.DB, ctlNoWrite, async.Args(kx))
				if err != nil || n != 1 {
					t.Errorf("Deschedule: n=%d err=%v", n, err)
				}
				if err := async.Retry(d.DB, x.ID); err != nil {
					t.Errorf("Retry: %v", err)
				}
				j := *x
				if err := j.Execute(d.DB); err != nil {
					t.Errorf("Execute: %v", err)
				}
				return errors.New("the first run fails")
			})
			startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, BatchSize: 2, BatchWindow: time.Minute, PollInterval: 20 * time.Millisecond})
			recv(t, executedByOther, 30*time.Second, "x's first run")
			waitFor(t, 30*time.Second, "x's two runs reported", func() bool {
				mu.Lock()
				defer mu.Unlock()
				return len(outcomes) == 2
			})
			mu.Lock()
			defer mu.Unlock()
			assert.ElementsMatch(t, []async.Outcome{async.OutcomeExecuted, async.OutcomeSkipped}, outcomes,
				"one run executed x (Execute's); the failed one did not")
			gx := getJob(t, d.DB, x.ID)
			assert.NotNil(t, gx.Executed)
			assert.Equal(t, 1, gx.Attempts)
		})
	}
}

// A failed run's failure is recorded only while the run's claim still holds
// the job (the same owner and attempt). Once another claim holds it (the
// job was given back and claimed again by another runner, or its lease ran
// out and the same worker claimed it again), the stale run records nothing:
// the job is neither rescheduled nor ended failed, and the claim that holds
// it keeps it, so that its run goes ahead.
func TestFailureOfARunWhoseClaimWasTakenOverIsNotRecorded(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		for _, c := range []struct {
			name     string
			owner    string
			attempts int
		}{
			{"another owner, the same attempt", "new-claim", 1},
			{"the same owner, a later attempt", "stale-claim", 2},
		} {
			for _, max := range []int{25, 1} { // rescheduled, or ended failed, if recorded
				t.Run(fmt.Sprintf("%s/max_attempts=%d", c.name, max), func(t *testing.T) {
					job := scheduleCtl(t, d.DB, newKey(t, "taken"), async.MaxAttempts(max))
					leased := d.Clock.Now().Add(time.Hour)
					require.NoError(t, d.DB.Model(&async.Job{}).Where("id = ?", job.ID).
						Updates(map[string]any{"attempts": c.attempts, "locked_by": c.owner, "locked_until": leased}).Error)

					run := *job
					run.Attempts, run.LockedBy = 1, "stale-claim"
					failed := errors.New("the stale run failed")
					out, err := async.AfterBrokenTxForTest(d.DB, &run, failed, nil)
					assert.Equal(t, async.OutcomeSkipped, out)
					assert.ErrorIs(t, err, failed)

					got := getJob(t, d.DB, job.ID)
					assert.True(t, got.Pending(), "neither ended nor otherwise touched")
					assert.Nil(t, got.Scheduled, "not rescheduled")
					assert.Equal(t, 5, got.Priority)
					assert.Equal(t, c.owner, got.LockedBy, "the claim that holds it keeps it")
					assert.Equal(t, c.attempts, got.Attempts)
					assert.Zero(t, count(t, d.DB, "async_error", "job_id = ?", job.ID), "no failure recorded")
				})
			}
		}
	})
}

// A claim that takes jobs whose attempts ran out ends them failed in a
// second transaction. A job that meanwhile left the claim's hands (another
// process cancelled it, or took it over for a run of its own) is not ended
// failed: a cancelled job stays cancelled, a job another claim holds stays
// its, and neither gets an error row.
func TestExhaustedJobsLeftByTheClaimAreNotEndedFailed(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		other := secondHandle(t, d, d.DSN, nil) // another process
		cancelKey := newKey(t, "cancelled")
		cancelled := scheduleCtl(t, d.DB, cancelKey, async.MaxAttempts(1), async.Priority(9))
		taken := scheduleCtl(t, d.DB, newKey(t, "taken"), async.MaxAttempts(1), async.Priority(9))
		ended := scheduleCtl(t, d.DB, newKey(t, "ended"), async.MaxAttempts(1), async.Priority(9))
		runnable := scheduleCtl(t, d.DB, newKey(t, "runnable"))
		// Their one run was lost: the attempt counted, the lease run out.
		require.NoError(t, d.DB.Model(&async.Job{}).Where("id IN ?", []int64{cancelled.ID, taken.ID, ended.ID}).
			Updates(map[string]any{"attempts": 1, "locked_by": "dead-worker", "locked_until": d.Clock.Now().Add(-time.Minute)}).Error)
		// Between the claim and the statement that ends them failed.
		fired := false
		require.NoError(t, d.DB.Callback().Raw().Before("gorm:raw").Register("test:between_claim_and_end", func(tx *gorm.DB) {
			if fired || !strings.Contains(tx.Statement.SQL.String(), "attempts = attempts - 1") {
				return
			}
			fired = true
			n, err := async.Deschedule(other, ctlTask, async.Args(cancelKey))
			if err != nil || n != 1 {
				t.Errorf("Deschedule: n=%d err=%v", n, err)
			}
			if err := other.Exec("UPDATE async_job SET attempts = attempts + 1, locked_by = 'other-claim' WHERE id = ?", taken.ID).Error; err != nil {
				t.Errorf("taking the job over: %v", err)
			}
		}))
		claimed, err := async.ClaimForTest(d.DB, "this-claim", 10)
		require.NoError(t, err)
		require.True(t, fired)
		require.Len(t, claimed, 1)
		assert.Equal(t, runnable.ID, claimed[0].ID)

		c := getJob(t, d.DB, cancelled.ID)
		assert.NotNil(t, c.Cancelled)
		assert.Nil(t, c.Failed, "a cancelled job is not also failed")
		tk := getJob(t, d.DB, taken.ID)
		assert.True(t, tk.Pending(), "the job another claim took over is not ended")
		assert.Equal(t, "other-claim", tk.LockedBy)
		assert.Equal(t, 3, tk.Attempts, "its claim counted, this one uncounted by neither")
		e := getJob(t, d.DB, ended.ID)
		assert.NotNil(t, e.Failed, "the exhausted job still in the claim's hands ends failed")
		assert.Equal(t, 1, e.Attempts)
		assert.Zero(t, count(t, d.DB, "async_error", "job_id IN ?", []int64{cancelled.ID, taken.ID}), "no error rows for jobs not ended")
		assert.EqualValues(t, 1, count(t, d.DB, "async_error", "job_id = ?", ended.ID))
		assertEachJobInOneState(t, d.DB)
	})
}

// A claim that another claim has replaced (its job was cancelled, retried
// and claimed again, all while the first claimant stood between its claim
// and the run) is stale: its holder neither runs the job (the run's fence
// checks the claim's owner, not only its attempt) nor, giving it back,
// clears the claim that now holds it.
func TestStaleClaimNeitherRunsNorGivesBackAJobClaimedAgain(t *testing.T) {
	for _, giveBack := range []bool{false, true} {
		t.Run(fmt.Sprintf("give_back=%v", giveBack), func(t *testing.T) {
			eachDB(t, func(t *testing.T, d *testDB) {
				log := freshLog(t)
				g := newGate(log)
				j := mustSchedule(t, d.DB, parityRecord, async.Args(log, "j"))
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				type result struct {
					n   int
					err error
				}
				flushed := make(chan result, 1)
				go func() {
					// The Out line is written after the claim, before the run.
					n, err := async.FlushQueue(d.DB.WithContext(ctx), async.FlushOptions{Out: &blockingWriter{g: g}})
					flushed <- result{n, err}
				}()
				waitStarted(t, g)
				// Cancelled, retried (attempts back to 0) and claimed by
				// another: the same attempt as the first claim, another owner.
				n, err := async.Deschedule(d.DB, parityRecord, async.Args(log, "j"))
				require.NoError(t, err)
				require.EqualValues(t, 1, n)
				require.NoError(t, async.Retry(d.DB, j.ID))
				again, err := async.ClaimForTest(d.DB, "another-claim", 1)
				require.NoError(t, err)
				require.Len(t, again, 1)
				require.Equal(t, 1, again[0].Attempts)
				if giveBack {
					cancel() // the first claimant gives its job back
				}
				close(g.release)
				r := recv(t, flushed, time.Minute, "the first claimant")
				assert.Zero(t, r.n)
				if giveBack {
					assert.ErrorIs(t, r.err, context.Canceled)
				} else {
					assert.NoError(t, r.err)
				}
				assert.Empty(t, logged(log), "the stale claim did not run the job")
				got := jobState(t, d, j.ID)
				assert.True(t, got.Pending())
				assert.Equal(t, "another-claim", got.LockedBy, "the claim that holds the job keeps it")
				assert.Equal(t, 1, got.Attempts)
				assert.NotNil(t, got.LockedUntil)
			})
		})
	}
}

// assertEachJobInOneState checks that Health counts each job in exactly one
// state: pending, executed, cancelled or failed.
func assertEachJobInOneState(t *testing.T, db *gorm.DB) {
	t.Helper()
	rep, err := async.Health(db)
	require.NoError(t, err)
	q := rep.Queue
	assert.Equal(t, q.AllJobs, q.Executed+q.Cancelled+q.Failed+q.Remaining, "each job in exactly one state")
}

// descheduleOnFirstRun makes the ctlTask job of key deschedule itself
// during its first run, through another connection (the change commits at
// once, while the run goes on), and then return ret.
func descheduleOnFirstRun(t *testing.T, d *testDB, key string, ret error) {
	on(t, key, func(ctx context.Context, run int64) error {
		if run == 1 {
			n, err := async.Deschedule(d.DB, ctlTask, async.Args(key))
			if err != nil || n != 1 {
				t.Errorf("Deschedule: n=%d err=%v", n, err)
			}
		}
		return ret
	})
}
