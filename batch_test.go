package async_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// ScheduleMany: many jobs, several INSERT chunks, all-or-nothing.
func TestScheduleManyIsAllOrNothing(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		const n = 4000 // more than one statement on SQLite
		calls := make([]async.Call, n)
		for i := range calls {
			calls[i] = async.Task(writeEffect, async.Args(fmt.Sprintf("many-%d", i), i), async.Priority(i%3))
		}
		errRollback := errors.New("rollback")
		err := d.DB.Transaction(func(tx *gorm.DB) error {
			jobs, err := async.ScheduleMany(tx, calls...)
			require.NoError(t, err)
			require.Len(t, jobs, n)
			return errRollback
		})
		require.ErrorIs(t, err, errRollback)
		assert.Zero(t, count(t, d.DB, "async_job", ""))

		jobs, err := async.ScheduleMany(d.DB, calls...)
		require.NoError(t, err)
		require.Len(t, jobs, n)
		ids := map[int64]bool{}
		for _, j := range jobs {
			require.NotZero(t, j.ID)
			ids[j.ID] = true
		}
		assert.Len(t, ids, n, "every job has its own id")
		assert.EqualValues(t, n, count(t, d.DB, "async_job", ""))
		got := getJob(t, d.DB, jobs[n-1].ID)
		assert.Equal(t, jobs[n-1].Args, got.Args)
		assert.Equal(t, (n-1)%3, got.Priority)

		// One bad call: nothing is written.
		bad := append([]async.Call{async.Task(writeEffect, async.Args("ok", 1))}, async.Task(writeEffect, async.Args("missing-val")))
		_, err = async.ScheduleMany(d.DB, bad...)
		require.ErrorIs(t, err, async.ErrBadArguments)
		assert.ErrorContains(t, err, "job 2 of 2")
		assert.EqualValues(t, n, count(t, d.DB, "async_job", ""))
	})
}

// Group commit: each job's writes commit with its completion; a failing job
// rolls back only its own savepoint.
func TestGroupCommitIsolatesFailures(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		prefix := fmt.Sprintf("gc-%s-%d-", d.Kind, time.Now().UnixNano())
		const m = 40
		var calls []async.Call
		for i := 0; i < m; i++ {
			key := fmt.Sprintf("%s%d", prefix, i)
			if i%4 == 3 {
				calls = append(calls, async.Task(failAfterWrite, async.Args(key)))
			} else {
				calls = append(calls, async.Task(writeEffect, async.Args(key, i)))
			}
		}
		_, err := async.ScheduleMany(d.DB, calls...)
		require.NoError(t, err)
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 2, BatchSize: 8, BatchWindow: time.Minute, PollInterval: 20 * time.Millisecond})
		waitFor(t, 60*time.Second, "every job to run once", func() bool {
			return count(t, d.DB, "async_job", "executed IS NOT NULL") == 30 && count(t, d.DB, "async_error", "") == 10
		})
		assert.EqualValues(t, 30, count(t, d.DB, "effects", "k LIKE ?", prefix+"%"), "only the successful jobs' writes remain")
		for i := 3; i < m; i += 4 {
			key := fmt.Sprintf("%s%d", prefix, i)
			assert.Zero(t, count(t, d.DB, "effects", "k = ?", key))
			assert.EqualValues(t, 1, runCount(key))
		}
		assert.EqualValues(t, 10, count(t, d.DB, "async_job", "executed IS NULL AND scheduled IS NOT NULL AND attempts = 1"))
	})
}

// Group commit without failures: each batch completes in one statement and
// commits once, so every task runs once and a batch's jobs share their
// completion time. (Had the batch's completion failed, the jobs would have
// gone through the careful path, running each task again.)
func TestGroupCommitRunsEachTaskOnce(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		prefix := fmt.Sprintf("once-%s-%d-", d.Kind, time.Now().UnixNano())
		const m = 32
		var calls []async.Call
		for i := 0; i < m; i++ {
			calls = append(calls, async.Task(writeEffect, async.Args(fmt.Sprintf("%s%d", prefix, i), i)))
		}
		_, err := async.ScheduleMany(d.DB, calls...)
		require.NoError(t, err)
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, BatchSize: 16, BatchWindow: time.Minute, PollInterval: 20 * time.Millisecond})
		waitFor(t, 60*time.Second, "every job to run", func() bool {
			return count(t, d.DB, "async_job", "executed IS NOT NULL") == m
		})
		for i := 0; i < m; i++ {
			assert.EqualValues(t, 1, runCount(fmt.Sprintf("%s%d", prefix, i)))
		}
		var completions int64
		require.NoError(t, d.DB.Raw("SELECT COUNT(DISTINCT executed) FROM async_job").Scan(&completions).Error)
		assert.Less(t, completions, int64(m/2), "jobs completed in batches")
		assert.EqualValues(t, m, count(t, d.DB, "effects", "k LIKE ?", prefix+"%"))
		assert.Zero(t, count(t, d.DB, "async_job", "locked_by <> '' OR started IS NULL OR result IS NULL"))
	})
}

// leaveError writes its effect, then leaves an error on its handle without
// returning it.
func leaveError(ctx context.Context, tx *gorm.DB, key string) error {
	countRun(key)
	if err := tx.Create(&Effect{K: key}).Error; err != nil {
		return err
	}
	tx.AddError(errors.New("left on the handle"))
	return nil
}

func init() { async.MustRegister(leaveError) }

// Group commit: the tasks of a batch share a handle on its transaction, and
// an error one task leaves on it does not reach the next task's statements
// (which would fail them and rerun the batch carefully).
func TestGroupCommitTasksDoNotSeeAnotherTasksError(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		prefix := fmt.Sprintf("handle-%s-%d-", d.Kind, time.Now().UnixNano())
		var calls []async.Call
		for i := 0; i < 4; i++ {
			calls = append(calls, async.Task(leaveError, async.Args(fmt.Sprintf("%sleave%d", prefix, i))),
				async.Task(writeEffect, async.Args(fmt.Sprintf("%swrite%d", prefix, i), i)))
		}
		_, err := async.ScheduleMany(d.DB, calls...)
		require.NoError(t, err)
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, BatchSize: 8, BatchWindow: time.Minute, PollInterval: 20 * time.Millisecond})
		waitFor(t, 60*time.Second, "every job to run", func() bool {
			return count(t, d.DB, "async_job", "executed IS NOT NULL") == 8
		})
		for i := 0; i < 4; i++ {
			assert.EqualValues(t, 1, runCount(fmt.Sprintf("%sleave%d", prefix, i)))
			assert.EqualValues(t, 1, runCount(fmt.Sprintf("%swrite%d", prefix, i)))
		}
		assert.EqualValues(t, 8, count(t, d.DB, "effects", "k LIKE ?", prefix+"%"))
		assert.Zero(t, count(t, d.DB, "async_error", "1 = 1"))
	})
}

// Group commit: a slow job holds its batch's other jobs back only for the
// window; they go back to the queue and another runner takes them.
func TestGroupCommitWindowReleasesJobsBehindASlowOne(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		slow := fmt.Sprintf("slow-%s-%d", d.Kind, time.Now().UnixNano())
		release := make(chan struct{})
		on(t, slow, blockUntil(make(chan int64, 10), release))
		if d.Kind == "sqlite" {
			// One writer: the slow job's transaction holds the database, so
			// nothing else commits until it ends. What must still hold: the
			// window's release and the batch never run a job twice.
			close(release)
		}
		calls := []async.Call{async.Task(ctlTask, async.Args(slow), async.Priority(9))}
		for i := 0; i < 5; i++ {
			calls = append(calls, async.Task(writeEffect, async.Args(fmt.Sprintf("%s-%d", slow, i), i)))
		}
		_, err := async.ScheduleMany(d.DB, calls...)
		require.NoError(t, err)
		// AfterRun sees runs: a job given back unstarted had none.
		var mu sync.Mutex
		reported := map[int64][]async.Outcome{}
		plugin(t, d).AfterRun = func(_ context.Context, info async.RunInfo) {
			mu.Lock()
			defer mu.Unlock()
			reported[info.Job.ID] = append(reported[info.Job.ID], info.Outcome)
		}
		// One claim takes all six jobs into one batch; the slow one runs first.
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 2, BatchSize: 6, BatchWindow: 100 * time.Millisecond, PollInterval: 20 * time.Millisecond})
		if d.Kind != "sqlite" {
			waitFor(t, 30*time.Second, "the other jobs to run while the slow one is blocked", func() bool {
				return count(t, d.DB, "async_job", "executed IS NOT NULL") == 5
			})
			assert.EqualValues(t, 0, count(t, d.DB, "effects", "k = ?", slow), "the slow job has not committed")
			close(release)
		}
		waitFor(t, 30*time.Second, "the slow job to finish", func() bool {
			return count(t, d.DB, "async_job", "executed IS NOT NULL") == 6
		})
		for i := 0; i < 5; i++ {
			assert.EqualValues(t, 1, runCount(fmt.Sprintf("%s-%d", slow, i)))
		}
		assert.EqualValues(t, 1, runCount(slow))
		// The released jobs were claimed twice; their first attempt was
		// given back uncounted, and no lease is left behind.
		assert.Zero(t, count(t, d.DB, "async_job", "attempts <> 1 OR locked_by <> ''"))
		waitFor(t, 30*time.Second, "AfterRun for the six runs", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(reported) == 6
		})
		mu.Lock()
		defer mu.Unlock()
		for id, outcomes := range reported {
			assert.Equal(t, []async.Outcome{async.OutcomeExecuted}, outcomes, "job %d", id)
		}
	})
}

// Group commit: batches shrink to what the window holds. Jobs that take
// 10ms each, with a 40ms window: the first claim (pace unknown) takes a whole
// BatchSize; later claims take about the five that start within a window,
// so that a runner does not hold more jobs than it starts in a window.
func TestGroupCommitBatchesFitTheWindow(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		prefix := fmt.Sprintf("fit-%s-%d-", d.Kind, time.Now().UnixNano())
		const n = 40
		keys := sleepyJobs(t, d, prefix, n, 10*time.Millisecond)
		var mu sync.Mutex
		var batches []int
		restore := async.SetWorkerClaimHook(func(_, batch int) {
			mu.Lock()
			batches = append(batches, batch)
			mu.Unlock()
		})
		defer restore()
		runEachOnce(t, d, async.WorkerOptions{Concurrency: 1, BatchSize: 16, BatchWindow: 40 * time.Millisecond, PollInterval: 20 * time.Millisecond}, prefix, keys)
		mu.Lock()
		defer mu.Unlock()
		require.GreaterOrEqual(t, len(batches), 2)
		assert.Equal(t, 16, batches[0], "no pace known yet: BatchSize")
		assert.LessOrEqual(t, slices.Max(batches[1:]), 8, "later batches hold what starts within the window: %v", batches)
	})
}

// Group commit: when the window closes while a job that is not slow runs,
// its transaction commits after that job and the batch's other jobs go on
// in a new transaction of the same runner: none goes back to the queue
// (where it would be claimed again). Sixteen 10ms jobs in one claim, a
// 100ms window: two or so transactions, nothing released.
func TestGroupCommitWindowKeepsJobsThatDidNotFit(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		prefix := fmt.Sprintf("keep-%s-%d-", d.Kind, time.Now().UnixNano())
		const n = 16
		keys := sleepyJobs(t, d, prefix, n, 10*time.Millisecond)
		released := async.ReleasedForTest(d.DB)
		runEachOnce(t, d, async.WorkerOptions{Concurrency: 1, BatchSize: n, BatchWindow: 100 * time.Millisecond, PollInterval: 20 * time.Millisecond}, prefix, keys)
		assert.Zero(t, async.ReleasedForTest(d.DB)-released, "jobs given back to the queue")
		assert.Zero(t, count(t, d.DB, "async_job", "attempts <> 1 OR locked_by <> ''"))
	})
}

// sleepyJobs schedules n ctlTask jobs keyed prefix0, prefix1, ... that each
// take about run (the job's run time is what these tests are about: a
// sleep stands in for work), and returns their keys.
func sleepyJobs(t *testing.T, d *testDB, prefix string, n int, run time.Duration) []string {
	t.Helper()
	keys := make([]string, n)
	calls := make([]async.Call, n)
	for i := range calls {
		keys[i] = fmt.Sprintf("%s%d", prefix, i)
		on(t, keys[i], func(context.Context, int64) error { time.Sleep(run); return nil })
		calls[i] = async.Task(ctlTask, async.Args(keys[i]))
	}
	_, err := async.ScheduleMany(d.DB, calls...)
	require.NoError(t, err)
	return keys
}

// runEachOnce runs a worker with options o until every job in the table
// has executed, stops it, and asserts that each of keys (sleepyJobs under
// prefix) ran once and committed its one effect.
func runEachOnce(t *testing.T, d *testDB, o async.WorkerOptions, prefix string, keys []string) {
	t.Helper()
	stop := startWorker(t, d.DB, o)
	waitFor(t, 30*time.Second, "every job to run", func() bool {
		return count(t, d.DB, "async_job", "executed IS NOT NULL") == int64(len(keys))
	})
	stop()
	for _, k := range keys {
		assert.EqualValues(t, 1, runCount(k))
	}
	assert.EqualValues(t, len(keys), count(t, d.DB, "effects", "k LIKE ?", prefix+"%"))
}
