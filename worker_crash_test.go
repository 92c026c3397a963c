//go:build unix

package async_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/gormasync/async"
)

// Point 2: a worker process killed with SIGKILL in the middle of a task
// leaves none of the task's writes; the job runs again in another worker
// once its lease expires, and no job is lost.
func TestWorkerKilledMidTaskLeavesNoWritesAndJobRunsAgain(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		const lease = 2 * time.Second
		crashKey := newKey(t, "crash")
		crash, err := async.Schedule(d.DB, procTask, async.Args(crashKey, "block"), async.Priority(10))
		require.NoError(t, err)
		var keys []string
		for i := 0; i < 4; i++ {
			k := newKey(t, "other")
			keys = append(keys, k)
			_, err := async.Schedule(d.DB, procTask, async.Args(k, "ok"))
			require.NoError(t, err)
		}

		rl := newProcRunLog()
		a := helperWorker(t, d, rl, 3, lease)
		waitFor(t, time.Minute, "the crash job to start in the helper", func() bool { return rl.count(crashKey) == 1 })
		// The task has written its effect and blocks, its transaction open.
		assert.Zero(t, effects(t, d.DB, crashKey), "an uncommitted write is not visible")
		assert.Equal(t, 1, getJob(t, d.DB, crash.ID).Attempts)
		a.kill()

		// The server rolled the transaction back: nothing of the run remains.
		assert.Zero(t, effects(t, d.DB, crashKey))
		got := getJob(t, d.DB, crash.ID)
		assert.True(t, got.Pending())
		assert.Nil(t, got.Started)

		// Another worker takes the job over once the lease has expired.
		startWorker(t, d.DB, async.WorkerOptions{Lease: lease, PollInterval: 20 * time.Millisecond})
		got = waitJob(t, d.DB, crash.ID, time.Minute, "executed by the second worker", executed)
		assert.Equal(t, 2, got.Attempts, "the lost run counts as an attempt")
		assert.Nil(t, got.LockedUntil)
		waitFor(t, time.Minute, "every job executed", func() bool {
			return count(t, d.DB, "async_job", "executed IS NULL") == 0
		})
		assert.EqualValues(t, 1, effects(t, d.DB, crashKey))
		for _, k := range keys {
			assert.EqualValues(t, 1, effects(t, d.DB, k), "effects of %s", k)
		}
		assert.Zero(t, count(t, d.DB, "async_error", ""), "a lost run records no error")
	})
}

// Point 2: a job that kills its worker process every time still uses up its
// attempts and ends failed, so it cannot crash workers forever.
func TestJobThatKillsItsWorkerEndsFailed(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		key := newKey(t, "suicide")
		job, err := async.Schedule(d.DB, procTask, async.Args(key, "die"), async.MaxAttempts(2))
		require.NoError(t, err)
		failed := func() bool { return getJob(t, d.DB, job.ID).Failed != nil }

		deaths := 0
		for i := 0; i < 4 && !failed(); i++ {
			h := helperWorker(t, d, nil, 1, time.Second)
			stopped := false
			waitFor(t, time.Minute, "the helper to die or the job to fail", func() bool {
				select {
				case <-h.exited:
					stopped = true
					return true
				default:
					return failed()
				}
			})
			if stopped {
				ws := h.waitExit(time.Second)
				require.True(t, ws.Signaled() && ws.Signal().String() == "killed", "helper ended with %v", ws)
				deaths++
				continue
			}
			h.stop() // the job failed at claim time; this helper survives
		}
		assert.Equal(t, 2, deaths, "the job killed one worker per attempt")
		got := getJob(t, d.DB, job.ID)
		require.NotNil(t, got.Failed, "the job ended failed")
		assert.Nil(t, got.Executed)
		assert.Equal(t, 2, got.Attempts)
		assert.Empty(t, got.LockedBy)
		assert.WithinDuration(t, d.Clock.Now(), *got.Failed, time.Minute)
		var errs []async.JobError
		require.NoError(t, d.DB.Where("job_id = ?", job.ID).Find(&errs).Error)
		require.Len(t, errs, 1)
		assert.Contains(t, errs[0].Exception, async.ErrAttemptsExhausted.Error())
		assert.Zero(t, effects(t, d.DB, key))
		h, err := async.Health(d.DB)
		require.NoError(t, err)
		assert.EqualValues(t, 1, h.Queue.Failed)
	})
}

// Point 3: a job that runs longer than its lease is never started a second
// time while its first run is alive, however many workers poll meanwhile.
func TestJobLongerThanLeaseIsNotStartedTwice(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		const lease = time.Second
		key := newKey(t, "long")
		started, release := make(chan int64, 10), make(chan struct{})
		on(t, key, blockUntil(started, release))
		job := scheduleCtl(t, d.DB, key, async.Priority(10))

		// Two workers on separate handles, as in separate processes.
		other := secondHandle(t, d, d.DSN, nil)
		opts := async.WorkerOptions{Concurrency: 1, Lease: lease, PollInterval: 20 * time.Millisecond}
		startWorker(t, d.DB, opts)
		recv(t, started, time.Minute, "the first run to start")
		startWorker(t, other, opts)
		claimed := getJob(t, d.DB, job.ID)
		require.NotNil(t, claimed.LockedUntil)
		waitFor(t, time.Minute, "the lease to expire", func() bool { return d.Clock.Now().After(claimed.LockedUntil.Add(lease / 2)) })

		if d.Kind == "sqlite" {
			// One writer: the second worker's claims wait for the running
			// job's transaction (busy_timeout) and see it done afterwards.
			// The first worker polls too (its claims wait on its own
			// in-process lock) while the run goes on.
			time.Sleep(lease)
		} else {
			// A job scheduled now, at a lower priority, is run by the second
			// worker (the first has no free slot): its claims happened after
			// the lease expired, and skipped the running job.
			probe := newKey(t, "probe")
			p := scheduleCtl(t, d.DB, probe, async.Priority(1))
			waitJob(t, d.DB, p.ID, time.Minute, "probe executed by the second worker", executed)
		}
		select {
		case run := <-started:
			t.Fatalf("the job started a second time (run %d) while its first run was alive", run)
		default:
		}
		assert.EqualValues(t, 1, runCount(key))
		assert.Equal(t, 1, getJob(t, d.DB, job.ID).Attempts)
		close(release)
		got := waitJob(t, d.DB, job.ID, time.Minute, "executed", executed)
		assert.Equal(t, 1, got.Attempts)
		assert.EqualValues(t, 1, runCount(key))
		assert.EqualValues(t, 1, effects(t, d.DB, key))
		assert.Zero(t, count(t, d.DB, "async_error", ""))
	})
}

// Point 2 (prefetch): a worker process killed with SIGKILL while it holds
// jobs claimed ahead (ready for a slot, not started) besides its running
// job loses none of them: once the lease expires another worker runs each
// once; none ran in the killed process, and the lost claim counts as an
// attempt, as a crashed run's does.
func TestWorkerKilledWithJobsClaimedAheadLosesNone(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		const lease = 2 * time.Second
		schedule := func(what, mode string, prio int) (string, *async.Job) {
			k := newKey(t, what)
			job, err := async.Schedule(d.DB, procTask, async.Args(k, mode), async.Priority(prio))
			require.NoError(t, err)
			return k, job
		}
		// Quick jobs first (they teach the worker that jobs are short, so
		// that it claims ahead), then one that blocks, then followers.
		var keys []string
		for range 20 {
			k, _ := schedule("short", "ok", 10)
			keys = append(keys, k)
		}
		blockKey, blocker := schedule("block", "block", 5)
		var followers []string
		var after []*async.Job
		for range 10 {
			k, job := schedule("follower", "ok", 1)
			followers, after = append(followers, k), append(after, job)
		}

		rl := newProcRunLog()
		h := startHelper(t, d, rl, "worker", "ASYNC_HELPER_CONCURRENCY=1", "ASYNC_HELPER_LEASE="+lease.String(),
			"ASYNC_HELPER_STALE=1h") // jobs claimed ahead stay with it
		waitFor(t, time.Minute, "the blocker to start", func() bool { return rl.count(blockKey) == 1 })
		if d.Kind == "sqlite" {
			// The blocker holds the one writer, so no claim happens while
			// it runs: followers are ahead only if its own claim took them.
			t.Logf("followers claimed ahead: %d", claimedAhead(t, d.DB, after))
		} else {
			waitFor(t, time.Minute, "followers claimed ahead", func() bool { return claimedAhead(t, d.DB, after) > 0 })
		}
		ahead := claimedAhead(t, d.DB, after)
		h.kill()
		for _, k := range followers {
			assert.Zero(t, rl.count(k), "%s ran in the killed process", k)
		}

		startWorker(t, d.DB, async.WorkerOptions{Lease: lease, PollInterval: 20 * time.Millisecond})
		waitFor(t, time.Minute, "every job executed", func() bool {
			return count(t, d.DB, "async_job", "executed IS NULL") == 0
		})
		for _, k := range append(append(keys, blockKey), followers...) {
			assert.EqualValues(t, 1, effects(t, d.DB, k), "effects of %s", k)
		}
		assert.Equal(t, 2, getJob(t, d.DB, blocker.ID).Attempts, "the killed run counts")
		assert.EqualValues(t, ahead, count(t, d.DB, "async_job", "id IN ? AND attempts = 2", jobIDs(after)),
			"each lost claim ahead counts, no other")
		assert.Zero(t, count(t, d.DB, "async_error", ""), "a lost claim records no error")
	})
}
