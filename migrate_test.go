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

// lockWaiter returns the statement of a session of d's database that waits
// for a table lock (Postgres) or a table's metadata lock (MySQL), or "".
func lockWaiter(t testing.TB, d *testDB) string {
	t.Helper()
	var qs []string
	switch d.Kind {
	case "postgres":
		require.NoError(t, d.DB.Raw("SELECT query FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'").Scan(&qs).Error)
	case "mysql":
		require.NoError(t, d.DB.Raw("SELECT info FROM information_schema.processlist WHERE db = DATABASE() AND state LIKE '%metadata lock%'").Scan(&qs).Error)
	}
	if len(qs) == 0 {
		return ""
	}
	return qs[0]
}

// awaitUse waits for db.Use to return its error on done, failing at once if
// a session of d's database is seen waiting for a lock meanwhile.
func awaitUse(t *testing.T, d *testDB, done <-chan error, what string) error {
	t.Helper()
	deadline := time.After(time.Minute)
	for {
		select {
		case err := <-done:
			return err
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		case <-time.After(5 * time.Millisecond):
			if q := lockWaiter(t, d); q != "" {
				t.Fatalf("%s waits for a lock on the job table: %s", what, q)
			}
		}
	}
}

// A process that starts while others work (a rolling deploy, a new
// replica) migrates a schema that is already current without taking any
// lock on the job table. On Postgres, GORM's AutoMigrate altered every
// timestamp column of the library's tables on each start (ALTER COLUMN
// TYPE timestamptz(6) of a timestamptz(6) column), and the notify trigger
// was dropped and created again, each an ACCESS EXCLUSIVE lock that waited
// for the transactions using async_job, a running job's included; every
// claim, completion and Schedule of every process queued behind it until
// that job ended. On SQLite, GORM's migrator rebuilt async_job (copied
// into a new table, four times) at each start once the table had a row:
// with a job running, the start failed with SQLITE_BUSY.
func TestMigratingCurrentSchemaTakesNoTableLock(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		key := newKey(t, "running")
		started, release := make(chan int64, 1), make(chan struct{})
		on(t, key, blockUntil(started, release))
		scheduleCtl(t, d.DB, key)
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, PollInterval: 20 * time.Millisecond})
		t.Cleanup(func() { close(release) }) // before the worker stops
		recv(t, started, time.Minute, "the job to start")
		if d.Kind != "sqlite" { // SQLite: the running job holds the one write lock
			// An application transaction that scheduled a job and has not
			// committed yet.
			tx := d.DB.Begin()
			require.NoError(t, tx.Error)
			t.Cleanup(func() { tx.Rollback() })
			_, err := async.Schedule(tx, ctlTask, async.Args(newKey(t, "uncommitted")))
			require.NoError(t, err)
		}

		other := openDB(t, d.Kind, d.DSN, d.Clock)
		done := make(chan error, 1)
		go func() { done <- other.Use(&async.Plugin{Logger: testLogger()}) }()
		require.NoError(t, awaitUse(t, d, done, "another process's migration"))

		if d.Kind != "sqlite" {
			// The queue goes on meanwhile.
			job := scheduleCtl(t, other, newKey(t, "after"))
			assert.True(t, getJob(t, d.DB, job.ID).Pending())
		}
	})
}

// Processes that start together on a fresh database all migrate it: one
// makes the tables and the others find them made. Each used to find them
// missing and create them too, and all but one failed (a table that
// already exists; on Postgres, a duplicate key in pg_type).
func TestConcurrentMigrationsOfFreshDatabase(t *testing.T) {
	for _, kind := range dbKinds {
		t.Run(kind, func(t *testing.T) {
			for range 3 {
				dsn := createDatabase(t, kind)
				dbs := make([]*gorm.DB, 4)
				for i := range dbs {
					dbs[i] = openDB(t, kind, dsn, nil)
					require.NoError(t, dbs[i].Exec("SELECT 1").Error) // connected
				}
				start := make(chan struct{})
				errs := make(chan error, len(dbs))
				for _, db := range dbs {
					go func() {
						<-start
						errs <- db.Use(&async.Plugin{Logger: testLogger()})
					}()
				}
				close(start)
				for range dbs {
					require.NoError(t, <-errs)
				}
				require.NoError(t, dbs[0].AutoMigrate(&Effect{}))
				for _, db := range dbs {
					job, err := async.Schedule(db, ctlTask, async.Args(newKey(t, "after")))
					require.NoError(t, err)
					n, err := async.FlushQueue(db, async.FlushOptions{})
					require.NoError(t, err)
					assert.Equal(t, 1, n)
					assert.NotNil(t, getJob(t, db, job.ID).Executed)
				}
				if kind == "postgres" {
					var triggers int64
					require.NoError(t, dbs[0].Raw("SELECT COUNT(*) FROM pg_trigger WHERE tgrelid = 'async_job'::regclass AND NOT tgisinternal").Scan(&triggers).Error)
					assert.EqualValues(t, 1, triggers)
				}
			}
		})
	}
}

// A process keeps working on a table that a newer version extended (a
// rolling deploy's old processes): columns with a default or allowing
// NULL, another index. Its migration leaves them alone, and it schedules
// (one job and many), runs jobs and reports health.
func TestOlderProcessOnExtendedTable(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		for _, s := range []string{
			"ALTER TABLE async_job ADD COLUMN newer_note VARCHAR(20)",
			"ALTER TABLE async_job ADD COLUMN newer_flag INTEGER NOT NULL DEFAULT 7",
			"ALTER TABLE async_error ADD COLUMN newer_x INTEGER",
			"CREATE INDEX async_job_newer ON async_job (newer_flag)",
		} {
			require.NoError(t, d.DB.Exec(s).Error, s)
		}
		older := openDB(t, d.Kind, d.DSN, d.Clock)
		require.NoError(t, older.Use(&async.Plugin{Logger: testLogger()}))
		jobs := []*async.Job{scheduleCtl(t, older, newKey(t, "one"))}
		many, err := async.ScheduleMany(older, async.Task(ctlTask, async.Args(newKey(t, "many"))), async.Task(ctlTask, async.Args(newKey(t, "many"))))
		require.NoError(t, err)
		jobs = append(jobs, many...)
		key := newKey(t, "failing")
		on(t, key, func(context.Context, int64) error { return errors.New("boom") })
		failing := scheduleCtl(t, older, key)
		n, err := async.FlushQueue(older, async.FlushOptions{})
		require.ErrorContains(t, err, "boom")
		assert.Equal(t, len(jobs)+1, n, "ran, the failing one included")
		for _, j := range jobs {
			assert.NotNil(t, getJob(t, older, j.ID).Executed)
		}
		assert.EqualValues(t, 1, count(t, older, "async_error", "job_id = ?", failing.ID))
		h, err := async.Health(older)
		require.NoError(t, err)
		assert.EqualValues(t, len(jobs), h.Queue.Executed)

		assert.EqualValues(t, len(jobs)+1, count(t, d.DB, "async_job", "newer_flag = 7 AND newer_note IS NULL"))
		assert.True(t, d.DB.Migrator().HasIndex(&async.Job{}, "async_job_newer"))
		assert.True(t, d.DB.Migrator().HasColumn(&async.JobError{}, "newer_x"))
	})
}
