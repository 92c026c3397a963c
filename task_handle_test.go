package async_test

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// What a task can do wrong with its handle, and what the worker does about
// it: a handle kept past the run, a result set left open, an entry point
// called through another handle than its own; and, on SQLite, a group-commit
// batch held up by a slow job.

var keptHandles sync.Map // key -> the *gorm.DB its task was given

// keepHandle keeps its job's handle (as a task that hands tx to a goroutine,
// or stores it, would), then behaves as ctlTask.
func keepHandle(ctx context.Context, tx *gorm.DB, key string) error {
	keptHandles.Store(key, tx)
	return ctlTask(ctx, tx, key)
}

// leaveRowsOpen opens a result set on its job's handle and returns without
// closing it (a forgotten rows.Close()).
func leaveRowsOpen(ctx context.Context, tx *gorm.DB, key string) error {
	countRun(key)
	rows, err := tx.Raw("SELECT 1 UNION ALL SELECT 2").Rows()
	if err != nil {
		return err
	}
	_ = rows.Next()
	return nil
}

var appDB atomic.Pointer[gorm.DB] // the application's handle, as a global

// retryThroughAppHandle calls Retry through the application's handle
// instead of its own.
func retryThroughAppHandle(ctx context.Context, tx *gorm.DB, id int64) error {
	return async.Retry(appDB.Load(), id)
}

func init() {
	async.MustRegister(keepHandle)
	async.MustRegister(leaveRowsOpen)
	async.MustRegister(retryThroughAppHandle)
}

// A task's handle is valid while its run lasts. Kept and used afterwards it
// fails with ErrJobTransaction, and never reaches another job's transaction:
// on Postgres (pgx) and MariaDB the connection that held the run goes on
// holding the next ready job's run (its commit began it), where such a
// write would otherwise commit with that job.
func TestTaskHandleEndsWithItsRun(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		for range 20 {
			scheduleCtl(t, d.DB, newKey(t, "short"), async.Priority(10))
		}
		started, release := make(chan int64, 10), make(chan struct{})
		aKey := newKey(t, "a")
		on(t, aKey, blockUntil(started, release))
		_, err := async.Schedule(d.DB, keepHandle, async.Args(aKey), async.Priority(5))
		require.NoError(t, err)
		bKey, strayKey := newKey(t, "b"), newKey(t, "stray")
		type stray struct{ write, exec, row error }
		strays := make(chan stray, 1)
		on(t, bKey, func(ctx context.Context, run int64) error {
			h, _ := keptHandles.Load(aKey)
			a := h.(*gorm.DB) // A's handle, after A's run ended
			var s stray
			s.write = a.Create(&Effect{K: strayKey}).Error
			s.exec = a.Exec("INSERT INTO effects (k, val) VALUES (?, 0)", strayKey+"/exec").Error
			var one int
			s.row = a.Raw("SELECT 1").Row().Scan(&one)
			strays <- s
			return nil
		})
		b := scheduleCtl(t, d.DB, bKey, async.Priority(1))

		stop := startWorkerWith(t, d.DB, async.WorkerOptions{Concurrency: 1, Prefetch: 4, Lease: time.Hour, PollInterval: 20 * time.Millisecond},
			func(w *async.Worker) { async.SetStaleAfter(w, time.Hour) })
		recv(t, started, time.Minute, "A to start")
		if d.Kind != "sqlite" {
			// B waits ready in the worker, so that A's commit begins B's
			// run. (On SQLite a claim waits for the one writer, which A's
			// run holds, and runs do not chain.)
			waitFor(t, time.Minute, "B claimed ahead", func() bool { return claimedAhead(t, d.DB, []*async.Job{b}) == 1 })
		}
		close(release)
		s := recv(t, strays, time.Minute, "B to run")
		waitJob(t, d.DB, b.ID, time.Minute, "B", executed)
		stop()
		assert.ErrorIs(t, s.write, async.ErrJobTransaction, "a write through A's handle after A's run")
		assert.ErrorIs(t, s.exec, async.ErrJobTransaction, "a statement through A's handle after A's run")
		assert.ErrorIs(t, s.row, async.ErrJobTransaction, "a row read through A's handle after A's run")
		assert.Zero(t, effects(t, d.DB, strayKey), "nothing written through A's handle committed")
		assert.Zero(t, effects(t, d.DB, strayKey+"/exec"), "nothing written through A's handle committed")
		assert.EqualValues(t, 1, effects(t, d.DB, aKey))
	})
}

// A task that returns with a result set still open does not hold its
// worker slot: on Postgres (pgx) and MariaDB the open rows would keep the
// run's connection from being committed or closed until the shutdown
// timeout (here an hour) ended the jobs' context. The next job runs, and
// the worker stops at once when asked.
func TestTaskLeavingRowsOpenDoesNotHoldItsSlot(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		key := newKey(t, "rows")
		_, err := async.Schedule(d.DB, leaveRowsOpen, async.Args(key))
		require.NoError(t, err)
		next := scheduleCtl(t, d.DB, newKey(t, "next"), async.Priority(-1))
		stop := startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, PollInterval: 20 * time.Millisecond, ShutdownTimeout: time.Hour})
		waitJob(t, d.DB, next.ID, time.Minute, "the job after the one that left its rows open", executed)
		stop() // at once: an hour's ShutdownTimeout would outlast the test
		assert.EqualValues(t, 1, runCount(key))
	})
}

// SQLite, group commit: the window does not give back the jobs a slow job
// holds up, as the batch's transaction is the one writer until it commits:
// the release would wait for it, fail after busy_timeout (100ms here) and
// leave them leased, their attempt counted, though the runner counted them
// as given back. They run after it, in their runner's next transaction.
func TestSQLiteWindowKeepsJobsBehindASlowOne(t *testing.T) {
	clock := &testClock{}
	dsn := filepath.Join(t.TempDir(), "w.db") + "?_pragma=busy_timeout(100)&_pragma=journal_mode(WAL)"
	db := openDB(t, "sqlite", dsn, clock)
	require.NoError(t, db.Use(&async.Plugin{}))
	d := &testDB{Kind: "sqlite", DSN: dsn, DB: db, Clock: clock}
	migrateApp(t, d)

	aKey, bKey := newKey(t, "slow"), newKey(t, "behind")
	// The slow job: longer than the window and busy_timeout together.
	on(t, aKey, func(ctx context.Context, run int64) error { time.Sleep(400 * time.Millisecond); return nil })
	a := scheduleCtl(t, db, aKey, async.Priority(5))
	b := scheduleCtl(t, db, bKey, async.Priority(1), async.MaxAttempts(1))
	startWorker(t, db, async.WorkerOptions{Concurrency: 1, BatchSize: 2, BatchWindow: 10 * time.Millisecond,
		Lease: time.Minute, PollInterval: 20 * time.Millisecond})
	waitJob(t, db, a.ID, time.Minute, "the slow job", executed)
	got := waitJob(t, db, b.ID, time.Minute, "the job behind it", executed)
	assert.Equal(t, 1, got.Attempts)
	assert.EqualValues(t, 1, runCount(bKey))
	assert.Zero(t, count(t, db, "async_error", ""))
}

// SQLite: a task that calls an entry point (here Retry) through the
// application's handle instead of its own would wait for the in-process
// writer lock its own run holds. It waits at most the writer wait
// (SQLite's busy_timeout, at least 5s; shortened here) and fails with
// ErrWriterBusy, as a second writer fails at the database after
// busy_timeout: the job's failure is recorded, and the worker stops when
// asked.
func TestSQLiteEntryPointFromTaskFailsInsteadOfWaitingForItself(t *testing.T) {
	d := newTestDB(t, "sqlite", nil)
	migrateApp(t, d)
	appDB.Store(d.DB)
	async.SetWriterWait(d.DB, 200*time.Millisecond)
	other := scheduleCtl(t, d.DB, newKey(t, "other"), async.RunAfter(d.Clock.Now().Add(time.Hour)))
	job, err := async.Schedule(d.DB, retryThroughAppHandle, async.Args(other.ID), async.MaxAttempts(1))
	require.NoError(t, err)
	stop := startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, PollInterval: 20 * time.Millisecond})
	waitJob(t, d.DB, job.ID, time.Minute, "the job to fail", func(j *async.Job) bool { return j.Failed != nil })
	stop()
	var e async.JobError
	require.NoError(t, d.DB.Where("job_id = ?", job.ID).Take(&e).Error)
	assert.Contains(t, e.Exception, async.ErrWriterBusy.Error())

	// The same call from outside a task waits for the writer and succeeds.
	require.NoError(t, d.DB.Model(&async.Job{}).Where("id = ?", other.ID).Update("cancelled", d.Clock.Now()).Error)
	require.NoError(t, async.Retry(d.DB, other.ID))
	assert.True(t, errors.Is(async.Retry(d.DB, other.ID), async.ErrBadOption), "a pending job cannot be retried")
}
