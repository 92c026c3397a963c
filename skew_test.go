package async_test

import (
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Machines whose clocks differ: each process's times come from its own
// db.NowFunc, and times written by one are compared by another.

// skewedHandle opens d's database as a process whose clock is skew ahead
// of d's (behind if negative) would.
func skewedHandle(t testing.TB, d *testDB, skew time.Duration) *gorm.DB {
	t.Helper()
	c := &testClock{}
	c.Advance(skew)
	db := openDB(t, d.Kind, d.DSN, c)
	require.NoError(t, db.Use(&async.Plugin{SkipMigration: true, Logger: testLogger()}))
	return db
}

// Health and GroupProgress of a process whose clock is behind the clock
// that wrote a job or a group report ages and durations of zero, not
// negative ones: the oldest due job's age was -120 s two minutes into the
// producer's future, and a group's consumed and remaining seconds too.
func TestHealthOfSkewedClocksIsNotNegative(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		ahead := skewedHandle(t, d, 2*time.Minute)
		scheduleCtl(t, ahead, newKey(t, "due"))
		first := scheduleCtl(t, ahead, newKey(t, "member"), async.InGroup("skewed"), async.Priority(1))
		scheduleCtl(t, ahead, newKey(t, "member"), async.InGroup("skewed"), async.Priority(1))
		require.NoError(t, first.Execute(d.DB))

		h, err := async.Health(d.DB, async.Algorithm(async.AlgorithmPrecise))
		require.NoError(t, err)
		require.NotNil(t, h.Queue.OldestDueAgeSeconds)
		assert.GreaterOrEqual(t, *h.Queue.OldestDueAgeSeconds, 0.0, "oldest-due-age-seconds")
		assert.GreaterOrEqual(t, h.Queue.EstimatedCompletion, 0.0, "estimated-completion")
		pr, err := async.GroupProgress(d.DB, "skewed")
		require.NoError(t, err)
		require.NotNil(t, pr.ConsumedSeconds)
		assert.GreaterOrEqual(t, *pr.ConsumedSeconds, 0.0, "consumed_seconds")
		assert.GreaterOrEqual(t, *pr.RemainingSeconds, 0.0, "remaining_seconds")
	})
}

// A process whose clock is ahead of another's by more than the lease
// (here 2 minutes, leases of 1): the database effects of every job still
// commit once, and a job the other runs in strict mode is not started
// again (its row stays locked). Jobs the other has claimed and not started
// are claimed again at once, which costs each an attempt: one on its last
// attempt ends failed without a run. (The README says so: machines' clocks
// must agree to well within Lease.)
func TestClockAheadByMoreThanLease(t *testing.T) {
	eachServerDB(t, "runs side by side", func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		behind := skewedHandle(t, d, -2*time.Minute)

		// Claimed by the process behind, not started yet.
		last, spare := newKey(t, "last-attempt"), newKey(t, "spare")
		lastJob := scheduleCtl(t, d.DB, last, async.MaxAttempts(1))
		spareJob := scheduleCtl(t, d.DB, spare)
		claimed, err := async.ClaimLeaseForTest(behind, "behind", 2, time.Minute)
		require.NoError(t, err)
		require.Len(t, claimed, 2)
		n, err := async.FlushQueue(d.DB, async.FlushOptions{})
		require.NoError(t, err)
		assert.Equal(t, 1, n, "the process ahead took both: one ran")
		got := getJob(t, d.DB, lastJob.ID)
		require.NotNil(t, got.Failed, "its last attempt taken, the job ended failed")
		assert.Zero(t, effects(t, d.DB, last))
		got = getJob(t, d.DB, spareJob.ID)
		require.NotNil(t, got.Executed)
		assert.Equal(t, 2, got.Attempts, "the lost claim counted")
		for _, j := range claimed {
			info := async.RunClaimedForTest(behind, j)
			assert.Equal(t, async.OutcomeSkipped, info.Outcome, "job %d: %v", j.ID, info.Err)
			assert.ErrorIs(t, info.Err, async.ErrLeaseLost)
		}
		assert.EqualValues(t, 1, runCount(spare), "run once")
		assert.EqualValues(t, 1, effects(t, d.DB, spare))

		// Running in strict mode in the process behind: not started again.
		key := newKey(t, "running")
		started, release := make(chan int64, 10), make(chan struct{})
		on(t, key, blockUntil(started, release))
		job := scheduleCtl(t, d.DB, key, async.Priority(10))
		startWorker(t, behind, async.WorkerOptions{Concurrency: 1, PollInterval: 20 * time.Millisecond})
		recv(t, started, time.Minute, "the run behind to start")
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, PollInterval: 20 * time.Millisecond})
		probe := scheduleCtl(t, d.DB, newKey(t, "probe"), async.Priority(1))
		waitJob(t, d.DB, probe.ID, time.Minute, "a job run by the process ahead, whose claims passed the running one", executed)
		close(release)
		got = waitJob(t, d.DB, job.ID, time.Minute, "executed", executed)
		assert.Equal(t, 1, got.Attempts)
		assert.EqualValues(t, 1, runCount(key))
		assert.EqualValues(t, 1, effects(t, d.DB, key))
	})
}

// Health measures the database's clock against this process's (on SQLite,
// the host's against db.NowFunc), and a process whose clock is off by more
// than a few seconds says so when it installs the plugin.
func TestClockOffsetIsMeasuredAndWarnedAbout(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		h, err := async.Health(d.DB)
		require.NoError(t, err)
		require.NotNil(t, h.Database.ClockOffsetSeconds)
		assert.InDelta(t, 0, *h.Database.ClockOffsetSeconds, 2, "one host's clock")

		d.Clock.Advance(2 * time.Minute)
		h, err = async.Health(d.DB)
		require.NoError(t, err)
		assert.InDelta(t, -120, *h.Database.ClockOffsetSeconds, 2, "this process two minutes ahead")

		for _, c := range []struct {
			clock *testClock
			warns int
		}{{d.Clock, 1}, {&testClock{}, 0}} {
			logs := newLogCapture()
			db := openDB(t, d.Kind, d.DSN, c.clock)
			require.NoError(t, db.Use(&async.Plugin{SkipMigration: true, Logger: slog.New(logs)}))
			assert.Equal(t, c.warns, logs.count("clock (db.NowFunc) differs from the database's"))
		}
	})
}
