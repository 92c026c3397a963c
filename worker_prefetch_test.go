package async_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Prefetch: while a backlog of short jobs lasts, a worker claims more jobs
// than it has free slots and keeps them ready.

// prefetchQueue schedules, in run order, shorts quick jobs (priority 10),
// one job that blocks until release (priority 5) and followers quick jobs
// (priority 1). A worker with one slot runs the shorts, which teaches it
// that jobs are short, and claims followers ahead while the blocker runs.
func prefetchQueue(t *testing.T, db *gorm.DB, shorts, followers int) (blocker *async.Job, blocked <-chan int64, release chan struct{}, after []*async.Job, afterKeys []string) {
	t.Helper()
	for range shorts {
		scheduleCtl(t, db, newKey(t, "short"), async.Priority(10))
	}
	started := make(chan int64, 10)
	release = make(chan struct{})
	key := newKey(t, "blocker")
	on(t, key, blockUntil(started, release))
	blocker = scheduleCtl(t, db, key, async.Priority(5))
	for range followers {
		k := newKey(t, "follower")
		afterKeys = append(afterKeys, k)
		after = append(after, scheduleCtl(t, db, k, async.Priority(1)))
	}
	return blocker, started, release, after, afterKeys
}

// claimedAhead counts the jobs of after that a claim holds.
func claimedAhead(t *testing.T, db *gorm.DB, after []*async.Job) int64 {
	return count(t, db, "async_job", "id IN ? AND attempts = 1 AND locked_by <> ''", jobIDs(after))
}

// A worker that stops gives back at once the jobs it claimed ahead, their
// attempts uncounted, and starts none of them; the running job finishes.
func TestWorkerPrefetchShutdownGivesBackReadyJobs(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		blocker, blocked, release, after, _ := prefetchQueue(t, d.DB, 20, 10)
		w, err := async.NewWorker(d.DB, async.WorkerOptions{Concurrency: 1, Prefetch: 4, Lease: time.Hour,
			PollInterval: time.Hour, ShutdownTimeout: time.Minute})
		require.NoError(t, err)
		async.SetStaleAfter(w, time.Hour) // ready jobs stay ready while the blocker runs
		ctx, cancel := context.WithCancel(context.Background())
		ran := make(chan error, 1)
		go func() { ran <- w.Run(ctx) }()
		recv(t, blocked, time.Minute, "the blocker to start")
		if d.Kind == "sqlite" {
			// The blocker holds the one writer, so no claim happens while
			// it runs: followers are ahead only if its own claim took them.
			t.Logf("followers claimed ahead: %d", claimedAhead(t, d.DB, after))
		} else {
			waitFor(t, time.Minute, "followers claimed ahead", func() bool { return claimedAhead(t, d.DB, after) > 0 })
		}
		cancel()
		close(release)
		require.NoError(t, recv(t, ran, time.Minute, "Run to return"))

		assert.NotNil(t, getJob(t, d.DB, blocker.ID).Executed, "the running job finished and committed")
		for _, j := range after {
			got := getJob(t, d.DB, j.ID)
			assert.True(t, got.Pending(), "job %d", j.ID)
			assert.Zero(t, got.Attempts, "job %d: a job claimed ahead and not started does not count an attempt", j.ID)
			assert.Empty(t, got.LockedBy, "job %d", j.ID)
			assert.Nil(t, got.LockedUntil, "job %d", j.ID)
			assert.Nil(t, got.Started, "job %d", j.ID)
		}
		assert.Zero(t, count(t, d.DB, "effects", "k LIKE ?", t.Name()+"/follower/%"), "no follower ran")
	})
}

// Jobs claimed ahead do not wait behind a long job: once no slot has freed
// for a while, they go back, and another worker runs them while the long
// job still runs. (Postgres and MySQL: on SQLite the long job holds the one
// writer, so no other run could proceed anyway.)
func TestWorkerPrefetchGivesBackJobsStuckBehindALongJob(t *testing.T) {
	eachServerDB(t, "on SQLite the long job holds the one writer", func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		blocker, blocked, release, after, _ := prefetchQueue(t, d.DB, 20, 10)
		released := false
		defer func() {
			if !released {
				close(release)
			}
		}()
		// Worker A, as another process would, with its own log.
		logs := newLogCapture()
		a := secondHandle(t, d, d.DSN, &async.Plugin{Logger: logs.logger()})
		w, err := async.NewWorker(a, async.WorkerOptions{Concurrency: 1, Prefetch: 4, Lease: time.Hour,
			PollInterval: time.Hour, ShutdownTimeout: time.Minute})
		require.NoError(t, err)
		async.SetStaleAfter(w, 200*time.Millisecond)
		ctx, cancel := context.WithCancel(context.Background())
		ran := make(chan error, 1)
		go func() { ran <- w.Run(ctx) }()
		recv(t, blocked, time.Minute, "the blocker to start")
		logs.waitLog(t, "gives back jobs claimed ahead", 1, time.Minute)

		// Another worker runs every follower while the blocker still runs
		// (A held some with a lease of an hour).
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 2, Prefetch: -1, PollInterval: 20 * time.Millisecond})
		for _, j := range after {
			waitJob(t, d.DB, j.ID, time.Minute, "a follower run by the other worker", executed)
			assert.Equal(t, 1, getJob(t, d.DB, j.ID).Attempts, "job %d: the give-back uncounted A's claim", j.ID)
		}
		assert.Nil(t, getJob(t, d.DB, blocker.ID).Executed, "the blocker is still running")
		released = true
		close(release)
		waitJob(t, d.DB, blocker.ID, time.Minute, "the blocker", executed)
		cancel()
		require.NoError(t, recv(t, ran, time.Minute, "Run to return"))
	})
}

// Strict mode on Postgres and MariaDB: a run's COMMIT travels with the next
// ready job's BEGIN and fence, and every job still runs exactly once, each
// in its own transaction. (SQLite, and MySQL, which has no compound
// statements outside stored programs, begin each run alone.)
func TestStrictRunsChain(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		var keys []string
		var jobs []*async.Job
		for range 60 {
			k := newKey(t, "job")
			keys = append(keys, k)
			jobs = append(jobs, scheduleCtl(t, d.DB, k))
		}
		before := async.ChainedRuns()
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 2, PollInterval: 20 * time.Millisecond})
		for _, j := range jobs {
			waitJob(t, d.DB, j.ID, time.Minute, "a job", executed)
		}
		for i, j := range jobs {
			assert.EqualValues(t, 1, effects(t, d.DB, keys[i]), "job %d: one committed run", j.ID)
			assert.EqualValues(t, 1, runCount(keys[i]), "job %d: started once", j.ID)
			assert.Equal(t, 1, getJob(t, d.DB, j.ID).Attempts)
		}
		chained := async.ChainedRuns() - before
		info, err := async.Dialect(d.DB)
		require.NoError(t, err)
		if d.Kind == "postgres" || strings.Contains(info.Version, "MariaDB") {
			assert.Positive(t, chained, "runs began with the previous commit")
		} else {
			assert.Zero(t, chained)
		}
	})
}

// A job claimed ahead and cancelled before it starts is skipped, also when
// its run begins in the same round trip as the previous run's commit
// (Postgres, MariaDB): the fence finds it no longer pending. (Postgres and MySQL: on
// SQLite the cancellation waits for the one writer, which the running job
// holds, so whether it comes before the next run is up to timing.)
func TestWorkerSkipsAJobCancelledWhileReady(t *testing.T) {
	eachServerDB(t, "on SQLite the cancellation waits for the one writer", func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		_, blocked, release, after, keys := prefetchQueue(t, d.DB, 20, 10)
		stop := startWorkerWith(t, d.DB, async.WorkerOptions{Concurrency: 1, Prefetch: 4, Lease: time.Hour,
			PollInterval: 20 * time.Millisecond}, func(w *async.Worker) { async.SetStaleAfter(w, time.Hour) })
		recv(t, blocked, time.Minute, "the blocker to start")
		waitFor(t, time.Minute, "the first follower claimed ahead", func() bool { return claimedAhead(t, d.DB, after[:1]) == 1 })
		// On MySQL a claim's locking read holds each row it passes over for
		// a moment; Deschedule waits a while for such a row (claimWait), but
		// a claim slowed down by the race detector may hold it longer: try
		// until the job is cancelled.
		var cancelled int64
		waitFor(t, time.Minute, "the ready job cancelled", func() bool {
			n, err := async.Deschedule(d.DB, ctlTask, async.Args(keys[0]))
			require.NoError(t, err)
			cancelled += n
			return cancelled > 0
		})
		require.EqualValues(t, 1, cancelled, "the ready job is cancelled, once")
		close(release)
		for _, j := range after[1:] {
			waitJob(t, d.DB, j.ID, time.Minute, "a later follower", executed)
		}
		got := getJob(t, d.DB, after[0].ID)
		assert.NotNil(t, got.Cancelled)
		assert.Nil(t, got.Executed)
		assert.Nil(t, got.Started, "the cancelled job never started")
		assert.Zero(t, runCount(keys[0]), "its task never ran")
		stop()
	})
}
