package async_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// gatedRuns returns a behaviour that reports each run on started, waits for
// one token on release, then fails while failing holds.
func gatedRuns(started chan<- int64, release <-chan struct{}, fail func(run int64) error) behaviour {
	return func(ctx context.Context, run int64) error {
		started <- run
		select {
		case <-release:
		case <-ctx.Done():
			return ctx.Err()
		}
		return fail(run)
	}
}

// noStart schedules a probe job of the lowest priority and waits for it to
// be executed: the worker has claimed since, and, having one slot, would
// have taken (and blocked in) any runnable job first. It fails the test if
// a run was reported on started meanwhile.
func noStart(t *testing.T, d *testDB, started <-chan int64, why string) {
	t.Helper()
	probe := scheduleCtl(t, d.DB, newKey(t, "probe"), async.Priority(-100))
	waitJob(t, d.DB, probe.ID, time.Minute, "probe executed", executed)
	select {
	case run := <-started:
		t.Fatalf("run %d started: %s", run, why)
	default:
	}
}

// Point 4: attempts are counted before the task starts; when they run out
// the job ends failed, shows in Health, and runs again only after Retry.
func TestWorkerCountsAttemptsAndFailsExhaustedJobs(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		key := newKey(t, "flaky")
		started, release := make(chan int64, 10), make(chan struct{}, 10)
		var failing atomic.Bool
		failing.Store(true)
		on(t, key, gatedRuns(started, release, func(run int64) error {
			if failing.Load() {
				return errors.New("flaky failure")
			}
			return nil
		}))
		job := scheduleCtl(t, d.DB, key, async.MaxAttempts(2))
		// One slot: a claim takes the highest priority job first, so a failed
		// job wrongly claimed would block the probe of noStart.
		startWorker(t, d.DB, async.WorkerOptions{ID: "attempts-worker", Concurrency: 1, PollInterval: 20 * time.Millisecond})

		for attempt := 1; attempt <= 2; attempt++ {
			recv(t, started, time.Minute, "a run to start")
			// Seen from another connection while the task runs.
			got := getJob(t, d.DB, job.ID)
			assert.Equal(t, attempt, got.Attempts, "the attempt is counted before the task runs")
			assert.Equal(t, "attempts-worker", got.LockedBy)
			assert.NotNil(t, got.LockedUntil)
			release <- struct{}{}
			waitJob(t, d.DB, job.ID, time.Minute, "run ended", func(j *async.Job) bool { return j.LockedBy == "" })
			d.Clock.Advance(time.Hour) // past the retry delay
		}
		got := waitJob(t, d.DB, job.ID, time.Minute, "failed", func(j *async.Job) bool { return j.Failed != nil })
		assert.WithinDuration(t, d.Clock.Now(), *got.Failed, time.Hour+time.Minute)
		assert.Nil(t, got.Executed)
		assert.Equal(t, 2, got.Attempts)
		assert.EqualValues(t, 2, count(t, d.DB, "async_error", "job_id = ?", job.ID))
		h, err := async.Health(d.DB)
		require.NoError(t, err)
		assert.EqualValues(t, 1, h.Queue.Failed)
		assert.Zero(t, h.Queue.Remaining)

		d.Clock.Advance(24 * time.Hour)
		noStart(t, d, started, "a failed job must not run again")
		assert.EqualValues(t, 2, runCount(key))

		failing.Store(false)
		require.NoError(t, async.Retry(d.DB, job.ID))
		recv(t, started, time.Minute, "the retried run to start")
		release <- struct{}{}
		got = waitJob(t, d.DB, job.ID, time.Minute, "executed after Retry", executed)
		assert.Equal(t, 1, got.Attempts)
		assert.Nil(t, got.Failed)
		assert.EqualValues(t, 1, effects(t, d.DB, key))
		h, err = async.Health(d.DB)
		require.NoError(t, err)
		assert.Zero(t, h.Queue.Failed)
	})
}

// Point 4: a task returning async.Permanent(err) fails its job at once, with
// attempts to spare; Retry runs it again.
func TestWorkerPermanentErrorFailsJobAtOnce(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		key := newKey(t, "permanent")
		errBad := errors.New("bad input")
		started, release := make(chan int64, 10), make(chan struct{}, 10)
		on(t, key, gatedRuns(started, release, func(run int64) error {
			if run == 1 {
				return async.Permanent(errBad)
			}
			return nil
		}))
		job := scheduleCtl(t, d.DB, key)
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, PollInterval: 20 * time.Millisecond})
		recv(t, started, time.Minute, "the run to start")
		release <- struct{}{}
		got := waitJob(t, d.DB, job.ID, time.Minute, "failed", func(j *async.Job) bool { return j.Failed != nil })
		assert.Equal(t, 1, got.Attempts)
		assert.Equal(t, async.DefaultMaxAttempts, got.MaxAttempts, "attempts were left")
		assert.WithinDuration(t, d.Clock.Now(), *got.Failed, time.Minute)
		var e async.JobError
		require.NoError(t, d.DB.Where("job_id = ?", job.ID).Take(&e).Error)
		assert.Contains(t, e.Exception, "bad input")
		assert.Zero(t, effects(t, d.DB, key))
		h, err := async.Health(d.DB)
		require.NoError(t, err)
		assert.EqualValues(t, 1, h.Queue.Failed)

		d.Clock.Advance(24 * time.Hour)
		noStart(t, d, started, "a failed job must not run again")

		require.NoError(t, async.Retry(d.DB, job.ID))
		recv(t, started, time.Minute, "the retried run to start")
		release <- struct{}{}
		waitJob(t, d.DB, job.ID, time.Minute, "executed after Retry", executed)
		assert.EqualValues(t, 1, effects(t, d.DB, key))
	})
}

// Point 7: the worker takes jobs in FlushQueue's order (priority, then due
// scheduled jobs by time, then the rest by id), waits for run-after times
// and serves only its queues.
func TestWorkerRespectsPriorityRunAfterAndQueues(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		var mu sync.Mutex
		order := map[string][]string{}
		now := d.Clock.Now()
		// The same jobs in two queues: one for the worker, one for FlushQueue.
		schedule := func(queue string, name string, opts ...async.Option) *async.Job {
			key := newKey(t, name)
			on(t, key, func(context.Context, int64) error {
				mu.Lock()
				order[queue] = append(order[queue], name)
				mu.Unlock()
				return nil
			})
			return scheduleCtl(t, d.DB, key, append(opts, async.Queue(queue))...)
		}
		var future *async.Job
		for _, q := range []string{"default", "flush"} {
			schedule(q, "p1", async.Priority(1))
			schedule(q, "p5-a", async.Priority(5))
			schedule(q, "p9", async.Priority(9))
			schedule(q, "p5-b", async.Priority(5))
			schedule(q, "p5-due-1m", async.Priority(5), async.RunAfter(now.Add(-time.Minute)))
			schedule(q, "p5-due-1h", async.Priority(5), async.RunAfter(now.Add(-time.Hour)))
			j := schedule(q, "future", async.Priority(10), async.RunAfter(now.Add(time.Hour)))
			if q == "default" {
				future = j
			}
		}
		other := schedule("other", "other-queue", async.Priority(10))
		n, err := async.FlushQueue(d.DB, async.FlushOptions{Queues: []string{"flush"}})
		require.NoError(t, err)
		require.Equal(t, 6, n)

		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, PollInterval: 20 * time.Millisecond})
		want := []string{"p9", "p5-due-1h", "p5-due-1m", "p5-a", "p5-b", "p1"}
		waitFor(t, time.Minute, "the due jobs executed", func() bool {
			return count(t, d.DB, "async_job", "executed IS NOT NULL AND queue = ?", "default") == int64(len(want))
		})
		mu.Lock()
		assert.Equal(t, want, order["default"])
		assert.Equal(t, order["flush"], order["default"], "the worker's order is FlushQueue's")
		mu.Unlock()
		assert.Nil(t, getJob(t, d.DB, future.ID).Executed)

		d.Clock.Advance(2 * time.Hour)
		waitJob(t, d.DB, future.ID, time.Minute, "the run-after job executed once due", executed)
		// A later claim (the probe's) would have taken the other queue's job
		// first, by priority, if the worker served that queue.
		noStart(t, d, nil, "")
		assert.Nil(t, getJob(t, d.DB, other.ID).Executed, "the default worker does not serve queue other")

		startWorker(t, d.DB, async.WorkerOptions{Queues: []string{"other"}, PollInterval: 20 * time.Millisecond})
		waitJob(t, d.DB, other.ID, time.Minute, "executed by the worker of queue other", executed)
	})
}

// Point 8: a slow job (blocked in its task, its transaction open) does not
// block Schedule in other transactions nor other workers' claims. On
// MariaDB the claims run at READ COMMITTED, so they take no gap locks that
// would stop inserts. SQLite has one writer: there Schedule waits for the
// slow job's transaction (busy_timeout) and then succeeds, and the new jobs
// run after it.
func TestSlowJobDoesNotBlockScheduleOrOtherWorkers(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		slow := newKey(t, "slow")
		started, release := make(chan int64, 10), make(chan struct{})
		on(t, slow, blockUntil(started, release))
		slowJob := scheduleCtl(t, d.DB, slow, async.Priority(10))
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, PollInterval: 20 * time.Millisecond})
		recv(t, started, time.Minute, "the slow job to start")

		// Schedule from other transactions: autocommit, an explicit
		// transaction, and a model hook inside GORM's create transaction.
		done := make(chan error, 1)
		go func() {
			done <- func() error {
				if _, err := async.Schedule(d.DB, ctlTask, async.Args(newKey(t, "autocommit"))); err != nil {
					return err
				}
				err := d.DB.Transaction(func(tx *gorm.DB) error {
					for i := 0; i < 2; i++ {
						if _, err := async.Schedule(tx, ctlTask, async.Args(newKey(t, "in-tx"))); err != nil {
							return err
						}
					}
					return nil
				})
				if err != nil {
					return err
				}
				return d.DB.Create(&Order{Item: "parcel"}).Error
			}()
		}()
		const newJobs = 4
		newDone := func() bool {
			return count(t, d.DB, "async_job", "executed IS NOT NULL AND id <> ?", slowJob.ID) == newJobs
		}
		if d.Kind == "sqlite" {
			// There is no signal for "Schedule is waiting for the lock":
			// give it a moment to be blocked before the slow job ends.
			time.Sleep(200 * time.Millisecond)
			close(release)
			require.NoError(t, recv(t, done, time.Minute, "Schedule to succeed once the slow job committed"))
			waitFor(t, time.Minute, "the new jobs executed", newDone)
		} else {
			require.NoError(t, recv(t, done, 30*time.Second, "Schedule while a slow job holds its transaction"))
			// Another worker (another pool, as in another process) claims
			// and runs them; the first one has no free slot.
			startWorker(t, secondHandle(t, d, d.DSN, nil), async.WorkerOptions{Concurrency: 2, PollInterval: 20 * time.Millisecond})
			waitFor(t, 30*time.Second, "the new jobs executed by the other worker while the slow job runs", newDone)
			assert.Nil(t, getJob(t, d.DB, slowJob.ID).Executed, "the slow job is still running")
			close(release)
		}
		waitJob(t, d.DB, slowJob.ID, time.Minute, "the slow job executed", executed)
		assert.EqualValues(t, 1, runCount(slow))
		assert.Zero(t, count(t, d.DB, "async_error", ""))
		assert.EqualValues(t, newJobs+1, count(t, d.DB, "effects", ""))
	})
}
