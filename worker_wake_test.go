package async_test

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

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

// idleWorker starts a worker that polls once an hour and returns once its
// first claims are over (it ran a sentinel job): from then on only a wake-up
// makes it look for jobs within the test's time.
func idleWorker(t *testing.T, d *testDB, poll time.Duration) {
	t.Helper()
	sentinel := scheduleCtl(t, d.DB, newKey(t, "sentinel"))
	startWorker(t, d.DB, async.WorkerOptions{PollInterval: poll})
	waitJob(t, d.DB, sentinel.ID, time.Minute, "the sentinel executed", executed)
}

// Point 10a: a worker polling once an hour picks up a job committed through
// the plugin in its own process (on Postgres with the NOTIFY trigger
// dropped, so that only the in-process wake-up can deliver).
func TestWorkerWakesOnCommitInProcess(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		if d.Kind == "postgres" {
			require.NoError(t, d.DB.Exec("DROP TRIGGER async_job_notify ON async_job").Error)
		}
		idleWorker(t, d, time.Hour)

		auto := scheduleCtl(t, d.DB, newKey(t, "autocommit"))
		waitJob(t, d.DB, auto.ID, 30*time.Second, "picked up after an autocommit Schedule", executed)

		var inTx *async.Job
		require.NoError(t, d.DB.Transaction(func(tx *gorm.DB) error {
			inTx = scheduleCtl(t, tx, newKey(t, "in-tx"))
			return nil
		}))
		waitJob(t, d.DB, inTx.ID, 30*time.Second, "picked up after the transaction's commit", executed)

		require.NoError(t, d.DB.Create(&Order{Item: "hooked"}).Error)
		waitFor(t, 30*time.Second, "the AfterCreate hook's job executed", func() bool {
			return count(t, d.DB, "async_job", "name = ? AND executed IS NOT NULL", "test.ship") == 1
		})

		errRollback := errors.New("rollback")
		require.ErrorIs(t, d.DB.Transaction(func(tx *gorm.DB) error {
			scheduleCtl(t, tx, newKey(t, "rolled-back"))
			return errRollback
		}), errRollback)
		assert.EqualValues(t, 4, count(t, d.DB, "async_job", ""))
	})
}

// Point 10b: on Postgres a worker polling once an hour picks up a job
// committed by another process or another *gorm.DB (whose in-process
// wake-ups do not reach it), through NOTIFY. MariaDB and SQLite have no such
// signal: there other processes' jobs are found by polling, which this test
// checks with a short poll interval.
func TestWorkerWakesOnCommitInAnotherProcess(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		poll := time.Hour
		if d.Kind != "postgres" {
			poll = 100 * time.Millisecond
		}
		idleWorker(t, d, poll)
		if d.Kind == "postgres" {
			waitFor(t, time.Minute, "the worker to LISTEN", func() bool {
				return count(t, d.DB, "pg_stat_activity", "datname = current_database() AND state = 'idle' AND query = ?", "LISTEN async_job") == 1
			})
		}

		other := secondHandle(t, d, d.DSN, nil)
		job := scheduleCtl(t, other, newKey(t, "other-handle"))
		waitJob(t, d.DB, job.ID, 30*time.Second, "picked up after another handle's commit", executed)

		key := newKey(t, "other-process")
		h := startHelper(t, d, nil, "schedule", "ASYNC_HELPER_KEY="+key)
		ws := h.waitExit(time.Minute)
		require.True(t, ws.Exited() && ws.ExitStatus() == 0, "scheduling helper ended with %v", ws)
		waitFor(t, 30*time.Second, "the other process's job executed", func() bool { return effects(t, d.DB, key) == 1 })
	})
}
