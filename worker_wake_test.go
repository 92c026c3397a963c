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
