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

// idleWorker starts a worker that polls once an hour and returns once its
// first claims are over (it ran a sentinel job): from then on only a wake-up
// makes it look for jobs within the test's time.
func idleWorker(t *testing.T, d *testDB, poll time.Duration) {
	t.Helper()
	sentinel := scheduleCtl(t, d.DB, newKey(t, "sentinel"))
	startWorker(t, d.DB, async.WorkerOptions{PollInterval: poll})
	waitJob(t, d.DB, sentinel.ID, time.Minute, "the sentinel executed", executed)
}

// idleWorkerInProcessOnly is idleWorker polling once an hour, on Postgres
// with the NOTIFY trigger dropped: only the in-process wake-up can reach it.
func idleWorkerInProcessOnly(t *testing.T, d *testDB) {
	t.Helper()
	if d.Kind == "postgres" {
		require.NoError(t, d.DB.Exec("DROP TRIGGER async_job_notify ON async_job").Error)
	}
	idleWorker(t, d, time.Hour)
}

// Point 10a: a worker polling once an hour picks up a job committed through
// the plugin in its own process (on Postgres with the NOTIFY trigger
// dropped, so that only the in-process wake-up can deliver).
func TestWorkerWakesOnCommitInProcess(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		idleWorkerInProcessOnly(t, d)

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

// spawnsJob schedules a follow-up job from inside its run, with Schedule or
// (many) with ScheduleMany.
func spawnsJob(ctx context.Context, tx *gorm.DB, key string, many bool) error {
	if many {
		_, err := async.ScheduleMany(tx, async.Task(ctlTask, async.Args(key+"-child")))
		return err
	}
	_, err := async.Schedule(tx, ctlTask, async.Args(key+"-child"))
	return err
}

func init() { async.MustRegister(spawnsJob) }

// A job a task schedules, with Schedule or ScheduleMany, wakes this
// process's idle workers when the run commits (on Postgres with the NOTIFY
// trigger dropped, so that only the in-process wake-up can deliver).
func TestWorkerWakesOnJobsScheduledByATask(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		idleWorkerInProcessOnly(t, d)
		for _, many := range []bool{false, true} {
			key := newKey(t, "spawn")
			_, err := async.Schedule(d.DB, spawnsJob, async.Args(key, many))
			require.NoError(t, err)
			waitFor(t, 30*time.Second, "the follow-up job executed", func() bool {
				return effects(t, d.DB, key+"-child") == 1
			})
		}
	})
}
