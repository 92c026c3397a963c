package async_test

import (
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
