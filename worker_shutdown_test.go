package async_test

import (
	"context"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// runRecorder is an AfterRun hook that keeps every RunInfo.
type runRecorder struct {
	mu    sync.Mutex
	infos []async.RunInfo
	ch    chan async.RunInfo
}

func newRunRecorder() *runRecorder { return &runRecorder{ch: make(chan async.RunInfo, 100)} }

func (r *runRecorder) hook(_ context.Context, info async.RunInfo) {
	r.mu.Lock()
	r.infos = append(r.infos, info)
	r.mu.Unlock()
	r.ch <- info
}

// next waits for the next run of job id and returns it.
func (r *runRecorder) next(t testing.TB, id int64) async.RunInfo {
	t.Helper()
	for {
		info := recv(t, r.ch, time.Minute, "a run to end")
		if info.Job.ID == id {
			return info
		}
	}
}

// noAsyncGoroutines checks that no goroutine runs code of package async
// (Run has returned). A job goroutine may still be returning from its final
// WaitGroup.Done when Run returns, hence the short grace; goleak then checks
// for any other goroutine left behind.
func noAsyncGoroutines(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(200 * time.Millisecond)
	for {
		left := asyncGoroutines()
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("goroutines running the worker's code after Run returned:\n%s", strings.Join(left, "\n\n"))
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// asyncGoroutines returns the stacks of the goroutines that are running code
// of package async (not async_test) right now.
func asyncGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		for _, line := range strings.Split(g, "\n") {
			if strings.HasPrefix(line, "github.com/gormasync/async.") {
				out = append(out, g)
				break
			}
		}
	}
	return out
}

// Point 5: JobTimeout cancels the task's context, rolls its writes back and
// records an error wrapping ErrTimeout; the job is retried later.
func TestWorkerJobTimeout(t *testing.T) {
	for _, kind := range dbKinds {
		t.Run(kind, func(t *testing.T) {
			rec := newRunRecorder()
			d := newTestDB(t, kind, &async.Plugin{AfterRun: rec.hook})
			migrateApp(t, d)
			key := newKey(t, "slow")
			started := make(chan int64, 10)
			on(t, key, blockUntil(started, nil)) // returns only when cancelled
			job := scheduleCtl(t, d.DB, key)
			startWorker(t, d.DB, async.WorkerOptions{JobTimeout: 300 * time.Millisecond, PollInterval: 20 * time.Millisecond})
			recv(t, started, time.Minute, "the run to start")

			info := rec.next(t, job.ID)
			assert.Equal(t, async.OutcomeRetry, info.Outcome)
			require.ErrorIs(t, info.Err, async.ErrTimeout)
			assert.ErrorContains(t, info.Err, context.DeadlineExceeded.Error(), "the task saw its context end")
			assert.ErrorIs(t, info.Err, context.DeadlineExceeded, "the task's own error stays in the chain")
			assert.GreaterOrEqual(t, info.Duration, 300*time.Millisecond)

			got := getJob(t, d.DB, job.ID)
			assert.True(t, got.Pending())
			assert.Equal(t, 1, got.Attempts)
			require.NotNil(t, got.Scheduled, "rescheduled by the retry policy")
			assert.True(t, got.Scheduled.After(d.Clock.Now()))
			assert.Zero(t, effects(t, d.DB, key), "the task's write is rolled back")
			var e async.JobError
			require.NoError(t, d.DB.Where("job_id = ?", job.ID).Take(&e).Error)
			assert.Contains(t, e.Exception, async.ErrTimeout.Error())
			assert.Contains(t, e.Traceback, "context deadline exceeded")
		})
	}
}

// Point 6: after cancel the worker claims nothing new; a running job that
// finishes within ShutdownTimeout commits; one that does not is cancelled,
// rolled back and left runnable, its attempt uncounted and its lease
// released; no goroutine outlives Run.
func TestWorkerGracefulShutdown(t *testing.T) {
	for _, kind := range dbKinds {
		t.Run(kind, func(t *testing.T) {
			rec := newRunRecorder()
			d := newTestDB(t, kind, &async.Plugin{AfterRun: rec.hook})
			migrateApp(t, d)
			finKey, stubKey := newKey(t, "finisher"), newKey(t, "stubborn")
			finStarted, finRelease := make(chan int64, 10), make(chan struct{})
			on(t, finKey, blockUntil(finStarted, finRelease))
			stubStarted := make(chan int64, 10)
			on(t, stubKey, func(ctx context.Context, run int64) error {
				stubStarted <- run
				<-ctx.Done()
				time.Sleep(300 * time.Millisecond) // a slow clean-up: Run must wait for it
				return ctx.Err()
			})
			fin := scheduleCtl(t, d.DB, finKey, async.Priority(9))
			stub := scheduleCtl(t, d.DB, stubKey, async.Priority(8))

			// run runs a worker until the runs on waits have started, cancels
			// it, calls whileStopping and checks that Run returns and leaves
			// no goroutine behind.
			run := func(concurrency int, whileStopping func(), waits ...chan int64) {
				w, err := async.NewWorker(d.DB, async.WorkerOptions{Concurrency: concurrency, Lease: time.Hour,
					PollInterval: 20 * time.Millisecond, ShutdownTimeout: 2 * time.Second})
				require.NoError(t, err)
				ignore := goleak.IgnoreCurrent() // the pool and the driver may stay
				ctx, cancel := context.WithCancel(context.Background())
				ran := make(chan error, 1)
				go func() { ran <- w.Run(ctx) }()
				for _, ch := range waits {
					recv(t, ch, time.Minute, "a run to start")
				}
				cancel()
				whileStopping()
				require.NoError(t, recv(t, ran, time.Minute, "Run to return"))
				noAsyncGoroutines(t)
				goleak.VerifyNone(t, ignore, goleak.IgnoreTopFunction("github.com/go-sql-driver/mysql.(*mysqlConn).startWatcher.func1"))
			}
			var late *async.Job
			whileStopping := func() {
				close(finRelease) // the finisher ends within the shutdown timeout
				// Scheduled after cancel: must not be claimed. (On SQLite this
				// waits for the finisher's transaction, the one writer.)
				late = scheduleCtl(t, d.DB, newKey(t, "late"))
			}
			if kind == "sqlite" {
				// One writer: runs are serialised, so each case gets its own Run.
				run(1, whileStopping, finStarted)
				run(1, func() {}, stubStarted)
			} else {
				run(3, whileStopping, finStarted, stubStarted)
			}

			got := getJob(t, d.DB, fin.ID)
			assert.NotNil(t, got.Executed, "the finisher committed")
			assert.EqualValues(t, 1, effects(t, d.DB, finKey))

			got = getJob(t, d.DB, stub.ID)
			assert.True(t, got.Pending())
			assert.Nil(t, got.Started)
			assert.Zero(t, got.Attempts, "an interrupted run does not count")
			assert.Empty(t, got.LockedBy, "the lease is released")
			assert.Nil(t, got.LockedUntil)
			assert.Zero(t, effects(t, d.DB, stubKey), "the interrupted run is rolled back")
			info := rec.next(t, stub.ID)
			assert.Equal(t, async.OutcomeInterrupted, info.Outcome)
			assert.ErrorIs(t, info.Err, context.Canceled)
			assert.Zero(t, count(t, d.DB, "async_error", ""), "an interruption is not a failure")

			// Scheduled after cancel: never claimed.
			lateJob := getJob(t, d.DB, late.ID)
			assert.Zero(t, lateJob.Attempts)
			assert.Empty(t, lateJob.LockedBy)

			// Another worker runs the interrupted job at once (its lease of
			// an hour would otherwise hold it back).
			on(t, stubKey, func(context.Context, int64) error { return nil })
			startWorker(t, d.DB, async.WorkerOptions{PollInterval: time.Hour})
			waitJob(t, d.DB, stub.ID, time.Minute, "executed by the next worker", executed)
			waitJob(t, d.DB, lateJob.ID, time.Minute, "executed by the next worker", executed)
		})
	}
}

// Point 6: the job a stopping worker gives back is taken at once by a worker
// that is running (idle, polling once an hour) in the same process.
func TestWorkerShutdownHandsInterruptedJobToRunningWorker(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		key := newKey(t, "handover")
		started := make(chan int64, 10)
		on(t, key, func(ctx context.Context, run int64) error {
			if run > 1 {
				return nil
			}
			started <- run
			<-ctx.Done()
			return ctx.Err()
		})
		job := scheduleCtl(t, d.DB, key, async.Priority(10))
		probe := scheduleCtl(t, d.DB, newKey(t, "probe"), async.Priority(1))

		stopA := startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, Lease: time.Hour,
			PollInterval: 20 * time.Millisecond, ShutdownTimeout: 100 * time.Millisecond})
		recv(t, started, time.Minute, "the first run to start")
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 2, PollInterval: time.Hour})
		if d.Kind != "sqlite" {
			// B's first claims are done and it is idle (on SQLite its claim
			// waits for A's run to end instead).
			waitJob(t, d.DB, probe.ID, time.Minute, "probe executed by B", executed)
		}
		stopA()
		got := waitJob(t, d.DB, job.ID, time.Minute, "executed by B", executed)
		assert.Equal(t, 1, got.Attempts, "A's interrupted run did not count")
		assert.EqualValues(t, 2, runCount(key))
		assert.EqualValues(t, 1, effects(t, d.DB, key))
		waitJob(t, d.DB, probe.ID, time.Minute, "probe executed", executed)
	})
}

// Point 6: an idle worker (on Postgres, listening) stops at once when
// cancelled, and leaves no goroutine behind.
func TestIdleWorkerStopsWithoutLeaks(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		sentinel := scheduleCtl(t, d.DB, newKey(t, "sentinel"))
		w, err := async.NewWorker(d.DB, async.WorkerOptions{PollInterval: time.Hour})
		require.NoError(t, err)
		ignore := goleak.IgnoreCurrent()
		ctx, cancel := context.WithCancel(context.Background())
		ran := make(chan error, 1)
		go func() { ran <- w.Run(ctx) }()
		waitJob(t, d.DB, sentinel.ID, time.Minute, "the sentinel executed", executed)
		if d.Kind == "postgres" {
			waitFor(t, time.Minute, "the worker to LISTEN", func() bool {
				return count(t, d.DB, "pg_stat_activity", "datname = current_database() AND state = 'idle' AND query = ?", "LISTEN async_job") == 1
			})
		}
		require.NotEmpty(t, asyncGoroutines(), "the running worker's goroutines are seen")
		cancel()
		require.NoError(t, recv(t, ran, time.Minute, "Run to return"))
		noAsyncGoroutines(t)
		goleak.VerifyNone(t, ignore, goleak.IgnoreTopFunction("github.com/go-sql-driver/mysql.(*mysqlConn).startWatcher.func1"))
	})
}

// Point 6: a job claimed but not started when the shutdown timeout ends (on
// SQLite, queued behind the one writer) is given back without running its
// task: no task starts after the worker's deadline.
func TestWorkerDoesNotStartJobsAfterShutdownTimeout(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		keys := []string{newKey(t, "a"), newKey(t, "b")}
		started := make(chan int64, 10)
		var jobs []*async.Job
		for _, k := range keys {
			on(t, k, blockUntil(started, nil)) // both run until cancelled
			jobs = append(jobs, scheduleCtl(t, d.DB, k))
		}
		stop := startWorker(t, d.DB, async.WorkerOptions{Concurrency: 2, Lease: time.Hour,
			PollInterval: 20 * time.Millisecond, ShutdownTimeout: 200 * time.Millisecond})
		recv(t, started, time.Minute, "a job to start")
		running := 1
		if d.Kind != "sqlite" {
			recv(t, started, time.Minute, "the other job to start")
			running = 2
		}
		// On SQLite the other job is claimed and waits for the writer lock,
		// which the running job keeps until the shutdown timeout ends.
		stop()
		var runs int64
		for _, k := range keys {
			runs += runCount(k)
		}
		assert.EqualValues(t, running, runs, "a task started after the shutdown timeout")
		for _, j := range jobs {
			got := getJob(t, d.DB, j.ID)
			assert.True(t, got.Pending())
			assert.Zero(t, got.Attempts, "job %d is given back", j.ID)
			assert.Empty(t, got.LockedBy)
			assert.Nil(t, got.LockedUntil)
		}
		assert.Zero(t, count(t, d.DB, "effects", ""))
	})
}

// Point 6: at shutdown, claimed jobs that have not started are given back at
// once instead of starting in the grace period: the rest of a group-commit
// batch, and on SQLite a job queued behind the one writer. The running job
// still finishes and commits.
func TestWorkerShutdownGivesBackUnstartedJobs(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		cases := []async.WorkerOptions{{Concurrency: 1, BatchSize: 2, BatchWindow: time.Hour}} // the window must not release the batch first
		if d.Kind == "sqlite" {
			cases = append(cases, async.WorkerOptions{Concurrency: 2}) // strict: queued behind the writer
		}
		migrateApp(t, d)
		for _, o := range cases {
			// Both tasks block until released, each signalling on its own
			// channel: whichever runs first, the other must not start.
			keys := []string{newKey(t, "a"), newKey(t, "b")}
			starts := []chan int64{make(chan int64, 10), make(chan int64, 10)}
			release := make(chan struct{})
			var jobs []*async.Job
			for i, k := range keys {
				on(t, k, blockUntil(starts[i], release))
				jobs = append(jobs, scheduleCtl(t, d.DB, k))
			}

			o.Lease, o.PollInterval, o.ShutdownTimeout = time.Hour, 20*time.Millisecond, time.Minute
			w, err := async.NewWorker(d.DB, o)
			require.NoError(t, err)
			ctx, cancel := context.WithCancel(context.Background())
			ran := make(chan error, 1)
			go func() { ran <- w.Run(ctx) }()
			run, waiting := jobs[0], jobs[1]
			select {
			case <-starts[0]:
			case <-starts[1]:
				run, waiting = jobs[1], jobs[0]
			case <-time.After(time.Minute):
				t.Fatal("no job started")
			}
			// Both are claimed (one claim fills the batch or both slots);
			// the other waits in its batch or for the writer.
			waitJob(t, d.DB, waiting.ID, time.Minute, "the other job claimed", func(j *async.Job) bool { return j.Attempts == 1 })
			cancel()
			close(release)
			require.NoError(t, recv(t, ran, time.Minute, "Run to return"))

			assert.NotNil(t, getJob(t, d.DB, run.ID).Executed, "%+v: the running job finished and committed", o)
			got := getJob(t, d.DB, waiting.ID)
			assert.Zero(t, len(starts[0])+len(starts[1]), "%+v: a job started after shutdown began", o)
			assert.EqualValues(t, 1, count(t, d.DB, "effects", ""), "%+v: only the running job's write", o)
			assert.True(t, got.Pending())
			assert.Zero(t, got.Attempts, "%+v: the unstarted job's attempt is given back", o)
			assert.Empty(t, got.LockedBy)
			assert.Nil(t, got.LockedUntil)
			_, err = async.FlushQueue(d.DB, async.FlushOptions{}) // empty the queue for the next case
			require.NoError(t, err)
			require.Zero(t, count(t, d.DB, "async_job", "executed IS NULL"))
			require.NoError(t, d.DB.Exec("DELETE FROM effects").Error)
		}
	})
}

// A give-back that the database never answers (here a statement held until
// its context ends) does not hold Run: after the shutdown timeout and the
// bookkeeping's grace, Run abandons it and returns. The job loses nothing:
// its run was rolled back, and it runs again when its lease expires.
func TestWorkerShutdownAbandonsStuckGiveBack(t *testing.T) {
	defer async.SetBookkeepingGrace(200 * time.Millisecond)()
	for _, kind := range dbKinds {
		t.Run(kind, func(t *testing.T) {
			rec := newRunRecorder()
			d := newTestDB(t, kind, &async.Plugin{AfterRun: rec.hook})
			s := newStuckGiveBack(t, d)
			w, err := async.NewWorker(d.DB, async.WorkerOptions{Concurrency: 1, Lease: time.Hour,
				PollInterval: 20 * time.Millisecond, ShutdownTimeout: 50 * time.Millisecond})
			require.NoError(t, err)
			ctx, cancel := context.WithCancel(context.Background())
			ran := make(chan error, 1)
			go func() { ran <- w.Run(ctx) }()
			s.stop(t, cancel)
			require.NoError(t, recv(t, ran, 30*time.Second, "Run to return with its give-back stuck"))
			assert.Equal(t, async.OutcomeInterrupted, rec.next(t, s.job.ID).Outcome)
			s.checkAbandoned(t, d)
		})
	}
}

// FlushQueue's bookkeeping after its context ends is bounded too.
func TestFlushQueueAbandonsStuckGiveBack(t *testing.T) {
	defer async.SetFlushBookkeeping(200 * time.Millisecond)()
	eachDB(t, func(t *testing.T, d *testDB) {
		s := newStuckGiveBack(t, d)
		ctx, cancel := context.WithCancel(context.Background())
		ran := make(chan error, 1)
		go func() {
			n, err := async.FlushQueue(d.DB.WithContext(ctx), async.FlushOptions{})
			assert.Zero(t, n)
			ran <- err
		}()
		s.stop(t, cancel)
		assert.ErrorIs(t, recv(t, ran, 30*time.Second, "FlushQueue to return with its give-back stuck"), context.Canceled)
		s.checkAbandoned(t, d)
	})
}

// stuckGiveBack is a job whose first run blocks until its context ends, on a
// database that never answers a give-back (stallStatements).
type stuckGiveBack struct {
	job     *async.Job
	key     string
	started chan int64
	stalled <-chan struct{}
	unstall func()
}

func newStuckGiveBack(t *testing.T, d *testDB) *stuckGiveBack {
	migrateApp(t, d)
	s := &stuckGiveBack{key: newKey(t, "stuck"), started: make(chan int64, 10)}
	on(t, s.key, func(ctx context.Context, run int64) error {
		if run > 1 {
			return nil
		}
		s.started <- run
		<-ctx.Done()
		return ctx.Err()
	})
	s.stalled, s.unstall = stallStatements(t, d.DB, "attempts = attempts - 1")
	s.job = scheduleCtl(t, d.DB, s.key)
	return s
}

// stop waits for the run to start, cancels it, and waits for its give-back.
func (s *stuckGiveBack) stop(t *testing.T, cancel func()) {
	recv(t, s.started, time.Minute, "the run to start")
	cancel()
	recv(t, s.stalled, time.Minute, "the interrupted run's give-back")
}

// checkAbandoned checks, once the runner has returned, that the job lost
// nothing and runs again once its lease has expired.
func (s *stuckGiveBack) checkAbandoned(t *testing.T, d *testDB) {
	s.unstall()
	got := getJob(t, d.DB, s.job.ID)
	assert.True(t, got.Pending())
	assert.NotEmpty(t, got.LockedBy, "the abandoned give-back left the lease")
	assert.Zero(t, effects(t, d.DB, s.key), "the interrupted run is rolled back")

	d.Clock.Advance(2 * time.Hour) // past the lease, and a partition lock's TTL
	n, err := async.FlushQueue(d.DB, async.FlushOptions{})
	require.NoError(t, err)
	assert.Equal(t, 1, n, "the job runs again once its lease has expired")
	assert.EqualValues(t, 1, effects(t, d.DB, s.key))
}

// stallStatements holds each statement db's callbacks run whose text
// contains text until its context ends, as a database that stopped
// answering would, and says so on stalled. unstall ends the stalling.
func stallStatements(t *testing.T, db *gorm.DB, text string) (stalled <-chan struct{}, unstall func()) {
	var stalling atomic.Bool
	stalling.Store(true)
	ch := make(chan struct{}, 10)
	unstick := make(chan struct{})
	var once sync.Once
	unstall = func() { once.Do(func() { stalling.Store(false); close(unstick) }) }
	t.Cleanup(unstall)
	require.NoError(t, db.Callback().Raw().Before("gorm:raw").Register("test:stall", func(db *gorm.DB) {
		if !stalling.Load() || !strings.Contains(db.Statement.SQL.String(), text) {
			return
		}
		select {
		case ch <- struct{}{}:
		default:
		}
		select {
		case <-db.Statement.Context.Done():
			db.AddError(context.Cause(db.Statement.Context))
		case <-unstick:
		}
	}))
	return ch, unstall
}
