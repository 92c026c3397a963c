package async_test

import (
	"context"
	"database/sql"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// purgeNoop is the task of TestClaimSkipsFinishedJobsNotYetPurged.
func purgeNoop(context.Context, *gorm.DB, string) error { return nil }

func init() { async.MustRegister(purgeNoop) }

// giveBack returns a claimed job to the queue, as a stopping worker does
// with the jobs it had not started.
func giveBack(t *testing.T, db *gorm.DB, id int64) {
	t.Helper()
	require.NoError(t, db.Exec("UPDATE async_job SET locked_by = '', locked_until = NULL, attempts = attempts - 1 WHERE id = ?", id).Error)
}

// TestClaimHintsKeepEveryJobReachable: on MySQL a claim reads from where the
// process's last claim stopped (claim_hint.go). A job below that point that
// becomes claimable again is still claimed: at once when the read above
// comes up short, and by the full read once the hint is old, when the queue
// above it stays full. Higher priorities are still found first, and a
// hinted priority that has emptied does not hide the ones below it. The
// other databases read from the head of the range every time.
func TestClaimHintsKeepEveryJobReachable(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		defer async.SetHintSpan(d.DB, time.Hour)()
		hinted := d.Kind == "mysql"
		var calls []async.Call
		for i := 0; i < 10; i++ {
			calls = append(calls, async.Task(writeEffect, async.Args(newKey(t, "hint"), 1)))
		}
		jobs, err := async.ScheduleMany(d.DB, calls...)
		require.NoError(t, err)
		id := func(n int) int64 { return jobs[n-1].ID } // the n-th job

		claim := func(limit int) []int64 {
			t.Helper()
			got, err := async.ClaimForTest(d.DB, "w", limit)
			require.NoError(t, err)
			return jobIDs(got)
		}
		require.Equal(t, []int64{id(1), id(2), id(3), id(4)}, claim(4))

		// Job 2 goes back. The queue above the hint fills the next claim.
		giveBack(t, d.DB, id(2))
		if hinted {
			assert.Equal(t, []int64{id(5), id(6), id(7)}, claim(3), "read from the hint on")
		} else {
			assert.Equal(t, []int64{id(2), id(5), id(6)}, claim(3))
		}
		// A claim that finds too few above the hint reads below it too.
		if hinted {
			assert.Equal(t, []int64{id(2), id(8), id(9), id(10)}, claim(10), "the short read also reads below the hint")
		} else {
			assert.Equal(t, []int64{id(7), id(8), id(9), id(10)}, claim(10))
		}
		assert.Empty(t, claim(10))

		// With the hint old, the first job in run order comes first again,
		// though the queue above the hint is full.
		more, err := async.ScheduleMany(d.DB, async.Task(writeEffect, async.Args(newKey(t, "hint"), 1)),
			async.Task(writeEffect, async.Args(newKey(t, "hint"), 1)))
		require.NoError(t, err)
		giveBack(t, d.DB, id(3))
		async.SetHintSpan(d.DB, -1)
		assert.Equal(t, []int64{id(3)}, claim(1), "a full read once the hint is old")
		async.SetHintSpan(d.DB, time.Hour)

		// A higher priority is found above the hinted one.
		high := mustSchedule(t, d.DB, writeEffect, async.Args(newKey(t, "hint"), 1), async.Priority(9))
		assert.Equal(t, []int64{high.ID}, claim(1), "the higher priority first")
		// That priority, hinted now, has nothing left: the claim goes below.
		assert.Equal(t, []int64{more[0].ID, more[1].ID}, claim(5), "an emptied top priority hides nothing")
	})
}

// analyze runs a statement under MariaDB's ANALYZE FORMAT=JSON and returns
// the index and data pages it touched and the report.
func analyze(t *testing.T, db *gorm.DB, stmt string) (int, string) {
	t.Helper()
	var out string
	require.NoError(t, db.Transaction(func(tx *gorm.DB) error {
		return tx.Raw("ANALYZE FORMAT=JSON " + stmt).Row().Scan(&out)
	}, &sql.TxOptions{Isolation: sql.LevelReadCommitted}))
	n := 0
	for _, m := range regexp.MustCompile(`"pages_accessed":\s*(\d+)`).FindAllStringSubmatch(out, -1) {
		v, err := strconv.Atoi(m[1])
		require.NoError(t, err)
		n += v
	}
	return n, out
}

// TestClaimSkipsFinishedJobsNotYetPurged: on InnoDB a finished job leaves
// its pending-index entry, delete-marked, until purge removes it, and purge
// waits for the oldest open snapshot. Here a snapshot stays open while 1,500
// jobs run, so their entries stay at the head of the pending range. The
// next claim reads from the process's hints and touches a few pages; the
// same read of the index without the hint's bound (the control) locks and
// looks up every finished job's entry. The hinted read names the index and
// uses the bound as the start of its range: left to choose, MariaDB reads
// the equality prefix from its head under load.
func TestClaimSkipsFinishedJobsNotYetPurged(t *testing.T) {
	d := newTestDB(t, "mysql", nil)
	var version string
	require.NoError(t, d.DB.Raw("SELECT VERSION()").Row().Scan(&version))
	if !strings.Contains(strings.ToLower(version), "mariadb") {
		t.Skipf("ANALYZE FORMAT=JSON with page counts is MariaDB's; server is %s", version)
	}
	defer async.SetHintSpan(d.DB, time.Hour)()

	const finished, fresh = 1500, 20
	schedule := func(n int) {
		calls := make([]async.Call, n)
		for i := range calls {
			calls[i] = async.Task(purgeNoop, async.Args(newKey(t, "purge")))
		}
		_, err := async.ScheduleMany(d.DB, calls...)
		require.NoError(t, err)
	}
	schedule(finished)

	// The snapshot that holds purge back, on a connection of its own.
	ctx := context.Background()
	sqlDB, err := d.DB.DB()
	require.NoError(t, err)
	conn, err := sqlDB.Conn(ctx)
	require.NoError(t, err)
	defer conn.Close()
	_, err = conn.ExecContext(ctx, "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
	require.NoError(t, err)
	_, err = conn.ExecContext(ctx, "START TRANSACTION WITH CONSISTENT SNAPSHOT")
	require.NoError(t, err)
	defer conn.ExecContext(ctx, "ROLLBACK") //nolint:errcheck
	var n int
	require.NoError(t, conn.QueryRowContext(ctx, "SELECT COUNT(*) FROM async_job").Scan(&n))

	require.Equal(t, finished, flush(t, d, async.FlushOptions{Jobs: finished}))
	schedule(fresh)

	stmts, err := async.ClaimReadsForTest(d.DB, 10)
	require.NoError(t, err)
	var reads []string
	for _, s := range stmts {
		pages, _ := analyze(t, d.DB, s)
		t.Logf("%d pages: %.120s", pages, s)
		assert.Less(t, pages, 100, "every read of the claim starts past the finished jobs")
		if strings.Contains(s, "FOR UPDATE") && strings.Contains(s, "scheduled IS NULL") {
			reads = append(reads, s)
		}
	}
	require.Len(t, reads, 1, "one read of the unscheduled jobs: the hinted read was not short")
	keyLen := func(report string) (string, int) {
		m := regexp.MustCompile(`"key": "(\w+)",\s*"key_length": "(\d+)"`).FindStringSubmatch(report)
		require.NotNil(t, m, "the read's plan names its key: %s", report)
		n, err := strconv.Atoi(m[2])
		require.NoError(t, err)
		return m[1], n
	}
	bound := regexp.MustCompile(` AND j\.id > \d+`)
	require.Regexp(t, bound, reads[0])
	_, report := analyze(t, d.DB, reads[0])
	control, controlReport := analyze(t, d.DB, bound.ReplaceAllString(reads[0], ""))
	t.Logf("control, the same read from the head of the range: %d pages", control)
	assert.Greater(t, control, 1000, "the finished jobs' entries are there to be read past")
	key, n := keyLen(report)
	_, nc := keyLen(controlReport)
	assert.Equal(t, "async_job_pending", key, "the read uses the pending index")
	assert.Greater(t, n, nc, "the hint's bound is part of the read's range, not a filter on it")
}
