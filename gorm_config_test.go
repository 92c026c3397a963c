package async_test

import (
	"database/sql"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"
	"gorm.io/gorm/schema"

	"github.com/gormasync/async"
)

// The plugin under GORM configurations applications use, and the wake-ups
// of jobs made runnable other than by an insert.

// eachDBWith runs fn on every database, opened with the gorm.Config shaped
// by shape.
func eachDBWith(t *testing.T, shape func(*gorm.Config), fn func(t *testing.T, d *testDB)) {
	t.Helper()
	for _, kind := range dbKinds {
		t.Run(kind, func(t *testing.T) { fn(t, newTestDBWith(t, kind, shape, nil)) })
	}
}

func prepareStmt(c *gorm.Config) { c.PrepareStmt = true }

// Under GORM's prepared-statement mode a task cannot commit its job's
// transaction either: its writes commit with the job's completion or not
// at all.
func TestPrepareStmtTaskCannotCommitJobTransaction(t *testing.T) {
	eachDBWith(t, prepareStmt, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		job, err := async.Schedule(d.DB, commitsItself, async.Args("ps"))
		require.NoError(t, err)
		err = job.Execute(d.DB)
		assert.ErrorIs(t, err, async.ErrJobTransaction)
		assert.Zero(t, count(t, d.DB, "effects", ""), "the task's write did not commit without the job's completion")
		assert.Nil(t, getJob(t, d.DB, job.ID).Executed)
	})
}

// Under GORM's prepared-statement mode (the db's, or a session's), a job
// committed in a transaction of this process wakes an idle worker at once
// (on Postgres with the NOTIFY trigger dropped).
func TestPrepareStmtWakesOnCommitInProcess(t *testing.T) {
	check := func(t *testing.T, d *testDB, db *gorm.DB) {
		migrateApp(t, d)
		idleWorkerInProcessOnly(t, d)
		var inTx *async.Job
		require.NoError(t, db.Transaction(func(tx *gorm.DB) error {
			inTx = scheduleCtl(t, tx, newKey(t, "in-tx"))
			return nil
		}))
		waitJob(t, d.DB, inTx.ID, 30*time.Second, "picked up after the transaction's commit", executed)
	}
	t.Run("config", func(t *testing.T) {
		eachDBWith(t, prepareStmt, func(t *testing.T, d *testDB) { check(t, d, d.DB) })
	})
	t.Run("session", func(t *testing.T) {
		eachDB(t, func(t *testing.T, d *testDB) { check(t, d, d.DB.Session(&gorm.Session{PrepareStmt: true})) })
	})
}

// A naming strategy that changes column names (here: Go's field names kept)
// or table names (a prefix) leaves the plugin's tables as it names them.
func TestNamingStrategies(t *testing.T) {
	for name, ns := range map[string]schema.NamingStrategy{
		"NoLowerCase": {NoLowerCase: true},
		"TablePrefix": {TablePrefix: "app_", SingularTable: true},
	} {
		t.Run(name, func(t *testing.T) {
			eachDBWith(t, func(c *gorm.Config) { c.NamingStrategy = ns }, func(t *testing.T, d *testDB) {
				require.NoError(t, d.DB.AutoMigrate(&Effect{}))
				job, err := async.Schedule(d.DB, ctlTask, async.Args(newKey(t, "naming")), async.InGroup("g"))
				require.NoError(t, err)
				n, err := async.FlushQueue(d.DB, async.FlushOptions{})
				require.NoError(t, err)
				assert.Equal(t, 1, n)
				assert.NotNil(t, getJob(t, d.DB, job.ID).Executed)
				_, err = async.Health(d.DB)
				require.NoError(t, err)
			})
		})
	}
}

// A group's final job, scheduled in this process with its group, starts
// when the group's last other job completes on an idle worker (polling once
// an hour), without waiting for the poll.
func TestFinalJobStartsWhenGroupCompletes(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		idleWorkerInProcessOnly(t, d)
		var member, final *async.Job
		require.NoError(t, d.DB.Transaction(func(tx *gorm.DB) error {
			member = scheduleCtl(t, tx, newKey(t, "member"), async.InGroup("g"))
			var err error
			final, err = async.OnCompletion(tx, "g", ctlTask, async.Args(newKey(t, "final")))
			return err
		}))
		waitJob(t, d.DB, member.ID, 30*time.Second, "the member executed", executed)
		waitJob(t, d.DB, final.ID, 30*time.Second, "the final job executed after its group completed", executed)
	})
}

// Retry wakes idle workers: in this process at once (the retried job is
// not an insert, which is what wakes them otherwise), and on Postgres in
// other processes by NOTIFY.
func TestRetryWakesIdleWorkers(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		key := newKey(t, "retried")
		job := scheduleCtl(t, d.DB, key, async.RunAfter(d.Clock.Now().Add(time.Hour)))
		n, err := async.Deschedule(d.DB, ctlTask, async.Args(key))
		require.NoError(t, err)
		require.EqualValues(t, 1, n)
		idleWorker(t, d, time.Hour)
		retrier := d.DB
		if d.Kind == "postgres" {
			waitFor(t, time.Minute, "the worker to LISTEN", func() bool { return listening(t, d) })
			retrier = secondHandle(t, d, d.DSN, nil) // another process's plugin: only NOTIFY reaches the worker
		}
		require.NoError(t, async.Retry(retrier, job.ID))
		waitJob(t, d.DB, job.ID, 30*time.Second, "the retried job executed", executed)
	})
}

// listening reports whether d's worker's LISTEN is in place (Postgres).
func listening(t *testing.T, d *testDB) bool {
	return count(t, d.DB, "pg_stat_activity", "datname = current_database() AND query = ?", "LISTEN async_job") == 1
}

// Postgres: a job another process commits while the worker's LISTEN
// connection is being re-established sends its NOTIFY to no one; once
// listening again the worker claims, and finds it.
func TestListenerBackClaimsJobsCommittedMeanwhile(t *testing.T) {
	d := newTestDB(t, "postgres", nil)
	migrateApp(t, d)
	idleWorker(t, d, time.Hour)
	waitFor(t, time.Minute, "the worker to LISTEN", func() bool { return listening(t, d) })
	require.NoError(t, d.DB.Exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND query = 'LISTEN async_job'").Error)
	other := secondHandle(t, d, d.DSN, nil)
	job := scheduleCtl(t, other, newKey(t, "while-reconnecting"))
	waitJob(t, d.DB, job.ID, time.Minute, "picked up once the listener came back", executed)
}

// opaquePool is a connection pool the plugin cannot see through, as a
// resolver's would be.
type opaquePool struct{ *sql.DB }

// Behind a pool the plugin cannot see through, GORM begins runs'
// transactions, and a task still cannot commit its job's: its writes
// commit with the job's completion.
func TestOpaquePoolTaskCannotCommitJobTransaction(t *testing.T) {
	for _, kind := range dbKinds {
		t.Run(kind, func(t *testing.T) {
			dsn := createDatabase(t, kind)
			d := &testDB{Kind: kind, DSN: dsn, Clock: &testClock{}}
			d.DB = openDB(t, kind, dsn, d.Clock)
			sqlDB, err := d.DB.DB()
			require.NoError(t, err)
			d.DB.ConnPool = opaquePool{sqlDB}
			d.DB.Statement.ConnPool = d.DB.ConnPool
			require.NoError(t, d.DB.Use(&async.Plugin{Logger: testLogger()}))
			migrateApp(t, d)

			job, err := async.Schedule(d.DB, commitsItself, async.Args("opaque"))
			require.NoError(t, err)
			assert.ErrorIs(t, job.Execute(d.DB), async.ErrJobTransaction)
			assert.Zero(t, count(t, d.DB, "effects", ""))
			assert.Nil(t, getJob(t, d.DB, job.ID).Executed)

			key := newKey(t, "opaque-ok")
			ok := scheduleCtl(t, d.DB, key)
			n, err := async.FlushQueue(d.DB, async.FlushOptions{})
			require.NoError(t, err)
			assert.Equal(t, 1, n)
			assert.NotNil(t, getJob(t, d.DB, ok.ID).Executed)
			assert.EqualValues(t, 1, effects(t, d.DB, key))
		})
	}
}
