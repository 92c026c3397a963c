package async_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

func groupOf(t testing.TB, d *testDB, id int64) *async.Group {
	t.Helper()
	var g async.Group
	require.NoError(t, d.DB.Where("id = ?", id).Take(&g).Error)
	return &g
}

// Point 2: a group is reused while none of its jobs is done; adding to a
// partly-done group is refused; a completed group starts a new generation
// with the same reference and description.
func TestGroupGenerations(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		desc := "nightly import"
		// An application may create the group itself, with a description.
		first := async.Group{Reference: "import", Description: &desc, Created: d.Clock.Now().UTC()}
		require.NoError(t, d.DB.Create(&first).Error)

		j1 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "1"), async.InGroup("import"))
		j2 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "2"), async.InGroup("import"))
		require.NotNil(t, j1.GroupID)
		assert.Equal(t, first.ID, *j1.GroupID, "an empty group is reused")
		assert.Equal(t, first.ID, *j2.GroupID, "a group with only pending jobs is reused")

		require.NoError(t, j1.Execute(d.DB))
		_, err := async.Schedule(d.DB, parityRecord, async.Args(log, "3"), async.InGroup("import"))
		require.ErrorIs(t, err, async.ErrGroupHasExecutedJobs)
		assert.Regexp(t, `^async: `, err.Error())
		assert.EqualValues(t, 2, count(t, d.DB, "async_job", "group_id = ?", first.ID), "the refused job is not added")

		require.NoError(t, j2.Execute(d.DB))
		d.Clock.Advance(time.Hour)
		j3 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "3"), async.InGroup("import"))
		require.NotEqual(t, first.ID, *j3.GroupID, "a completed group starts a new generation")
		next := groupOf(t, d, *j3.GroupID)
		assert.Equal(t, "import", next.Reference)
		require.NotNil(t, next.Description)
		assert.Equal(t, desc, *next.Description, "the description is carried over")
		assert.True(t, next.Created.After(first.Created))
		assert.Nil(t, first.Generation, "a group the application creates has no generation")
		require.NotNil(t, next.Generation)
		assert.EqualValues(t, 1, *next.Generation, "the first generation the library starts")
		j4 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "4"), async.InGroup("import"))
		assert.Equal(t, next.ID, *j4.GroupID, "the new generation is reused while pending")
		assert.EqualValues(t, 2, count(t, d.DB, "async_group", "reference = ?", "import"))

		// Cancelled and failed jobs make a group partly done too.
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "c1"), async.InGroup("cancelled"))
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "c2"), async.InGroup("cancelled"))
		_, err = async.Deschedule(d.DB, parityRecord, async.Args(log, "c1"))
		require.NoError(t, err)
		_, err = async.Schedule(d.DB, parityRecord, async.Args(log, "c3"), async.InGroup("cancelled"))
		assert.ErrorIs(t, err, async.ErrGroupHasExecutedJobs)

		f := mustSchedule(t, d.DB, parityFail, async.Args(log, "f1"), async.InGroup("failed"), async.MaxAttempts(1))
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "f2"), async.InGroup("failed"))
		require.Error(t, f.Execute(d.DB))
		require.NotNil(t, jobState(t, d, f.ID).Failed)
		_, err = async.Schedule(d.DB, parityRecord, async.Args(log, "f3"), async.InGroup("failed"))
		assert.ErrorIs(t, err, async.ErrGroupHasExecutedJobs)

		_, err = async.Schedule(d.DB, parityRecord, async.Args(log, "x"), async.InGroup(""))
		assert.ErrorIs(t, err, async.ErrBadOption)
	})
}

// Two transactions that start the same generation of a group at once (the
// reference's first, or the one after a completed group) end up in one
// group: the later waits for the earlier's new group row and joins that
// group once the earlier commits.
func TestConcurrentSchedulingSharesNewGroup(t *testing.T) {
	eachServerDB(t, "SQLite's one writer keeps the second transaction from writing until the first ends", func(t *testing.T, d *testDB) {
		log := freshLog(t)
		done := mustSchedule(t, d.DB, parityRecord, async.Args(log, "old"), async.InGroup("again"))
		require.NoError(t, done.Execute(d.DB))
		for _, ref := range []string{"new", "again"} {
			t.Run(ref, func(t *testing.T) {
				first := d.DB.Begin()
				require.NoError(t, first.Error)
				defer first.Rollback()
				j1 := mustSchedule(t, first, parityRecord, async.Args(log, ref+"1"), async.InGroup(ref))

				type result struct {
					job *async.Job
					err error
				}
				second := make(chan result, 1)
				go func() {
					var r result
					r.err = d.DB.Transaction(func(tx *gorm.DB) error {
						r.job, r.err = async.Schedule(tx, parityRecord, async.Args(log, ref+"2"), async.InGroup(ref))
						return r.err
					})
					second <- r
				}()
				// The second waits for the first (or, wrongly, finishes
				// with a group of its own while the first is still open).
				var r result
				got := false
				tick := time.NewTicker(5 * time.Millisecond)
				defer tick.Stop()
				deadline := time.After(30 * time.Second)
				for waiting := false; !waiting && !got; {
					select {
					case r = <-second:
						got = true
					case <-tick.C:
						waiting = lockWaits(t, d) > 0
					case <-deadline:
						t.Fatal("the second transaction neither finished nor waited for a lock")
					}
				}
				require.NoError(t, first.Commit().Error)
				if !got {
					r = <-second
				}
				require.NoError(t, r.err)
				require.NotNil(t, r.job.GroupID)
				assert.Equal(t, *j1.GroupID, *r.job.GroupID, "both jobs join one group")
				assert.EqualValues(t, 2, count(t, d.DB, "async_job", "group_id = ?", *j1.GroupID))
			})
		}
		assert.EqualValues(t, 1, count(t, d.DB, "async_group", "reference = ?", "new"))
		assert.EqualValues(t, 2, count(t, d.DB, "async_group", "reference = ?", "again"), "the completed generation and one new one")
	})
}

// lockWaits counts the sessions waiting for a row lock: on Postgres in d's
// database, on MySQL in statements on the group table.
func lockWaits(t testing.TB, d *testDB) int64 {
	t.Helper()
	q := map[string]string{
		"postgres": "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
		// innodb_trx names no database (and its thread ids did not always
		// match the process list's on MariaDB 10.11): the statement tells.
		"mysql": "SELECT COUNT(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT' AND trx_query LIKE '%async_group%'",
	}[d.Kind]
	var n int64
	require.NoError(t, d.DB.Raw(q).Scan(&n).Error)
	return n
}

// Point 2: the final job runs after every other job of its group, even when
// its id is the lowest and its priority the highest; it then runs in the
// same FlushQueue, ahead of lower priorities.
func TestOnCompletionFinalJobRunsLast(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		final, err := async.OnCompletion(d.DB, "batch", parityRecord, async.Args(log, "final"), async.Priority(10))
		require.NoError(t, err)
		require.NotNil(t, final.GroupID)
		g := groupOf(t, d, *final.GroupID)
		require.NotNil(t, g.FinalID)
		assert.Equal(t, final.ID, *g.FinalID)
		for _, l := range []string{"a", "b", "c"} {
			j := mustSchedule(t, d.DB, parityRecord, async.Args(log, l), async.InGroup("batch"))
			assert.Equal(t, g.ID, *j.GroupID)
			assert.Greater(t, j.ID, final.ID)
		}
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "ungrouped"), async.Priority(1))

		assert.Equal(t, 5, flush(t, d, async.FlushOptions{}))
		assert.Equal(t, []string{"a", "b", "c", "final", "ungrouped"}, logged(log))
	})
}

// Point 2: a final job waits while any other job of its group is pending,
// and runs once they are all executed, cancelled or failed.
func TestOnCompletionWaitsForExecutedCancelledOrFailed(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		now := freezeClock(d)
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "ok"), async.InGroup("g"))
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "cancel-me"), async.InGroup("g"))
		mustSchedule(t, d.DB, parityFail, async.Args(log, "fail"), async.InGroup("g"), async.MaxAttempts(2))
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "later"), async.InGroup("g"), async.RunAfter(now.Add(time.Hour)))
		final, err := async.OnCompletion(d.DB, "g", parityRecord, async.Args(log, "final"))
		require.NoError(t, err)
		_, err = async.Deschedule(d.DB, parityRecord, async.Args(log, "cancel-me"))
		require.NoError(t, err)

		n, err := async.FlushQueue(d.DB, async.FlushOptions{})
		require.Error(t, err, "the failing job stops the run")
		assert.Equal(t, 2, n)
		d.Clock.Advance(2 * time.Minute)
		_, err = async.FlushQueue(d.DB, async.FlushOptions{})
		require.Error(t, err)
		assert.Equal(t, []string{"ok", "fail", "fail"}, logged(log))
		assert.EqualValues(t, 1, count(t, d.DB, "async_job", "failed IS NOT NULL"))
		assert.Zero(t, flush(t, d, async.FlushOptions{}), "the final job waits for the job scheduled later")
		assert.Nil(t, jobState(t, d, final.ID).Executed)

		d.Clock.Advance(time.Hour)
		assert.Equal(t, 2, flush(t, d, async.FlushOptions{}))
		assert.Equal(t, []string{"ok", "fail", "fail", "later", "final"}, logged(log))
		assert.NotNil(t, jobState(t, d, final.ID).Executed)
	})
}

// Point 2: a group whose only job is its final job runs it.
func TestOnCompletionAloneRuns(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		final, err := async.OnCompletion(d.DB, "solo", parityRecord, async.Args(log, "final"))
		require.NoError(t, err)
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{}))
		assert.Equal(t, []string{"final"}, logged(log))
		assert.NotNil(t, jobState(t, d, final.ID).Executed)
		// The group is complete: the reference's next job starts a new generation.
		next := mustSchedule(t, d.DB, parityRecord, async.Args(log, "next"), async.InGroup("solo"))
		assert.NotEqual(t, *final.GroupID, *next.GroupID)
	})
}

// oldGroup is the group table as it was before groups had generations.
type oldGroup struct {
	ID          int64     `gorm:"primaryKey;autoIncrement"`
	Reference   string    `gorm:"size:191;not null;index:async_group_reference"`
	Description *string   `gorm:"type:text"`
	Created     time.Time `gorm:"precision:6;not null"`
	FinalID     *int64    `gorm:"index:async_group_final"`
}

func (oldGroup) TableName() string { return "async_group" }

// A group table from before generations migrates: its groups, several under
// one reference, keep no generation, and scheduling goes on from them.
func TestGroupTableWithoutGenerationsMigrates(t *testing.T) {
	for _, kind := range dbKinds {
		t.Run(kind, func(t *testing.T) {
			d := &testDB{Kind: kind, DSN: createDatabase(t, kind), Clock: &testClock{}}
			d.DB = openDB(t, kind, d.DSN, d.Clock)
			require.NoError(t, d.DB.AutoMigrate(&oldGroup{}))
			now := time.Now().UTC()
			require.NoError(t, d.DB.Create(&[]oldGroup{{Reference: "r", Created: now.Add(-time.Hour)}, {Reference: "r", Created: now}}).Error)
			require.NoError(t, d.DB.Use(&async.Plugin{Logger: testLogger()}))
			assert.True(t, d.DB.Migrator().HasIndex(&async.Group{}, "async_group_generation"))

			log := freshLog(t)
			j := mustSchedule(t, d.DB, parityRecord, async.Args(log, "1"), async.InGroup("r"))
			assert.Equal(t, "r", groupOf(t, d, *j.GroupID).Reference)
			assert.Nil(t, groupOf(t, d, *j.GroupID).Generation, "the newest old group, still empty, is reused")
			require.NoError(t, j.Execute(d.DB))
			k := mustSchedule(t, d.DB, parityRecord, async.Args(log, "2"), async.InGroup("r"))
			require.NotNil(t, groupOf(t, d, *k.GroupID).Generation)
			assert.EqualValues(t, 1, *groupOf(t, d, *k.GroupID).Generation)
			assert.EqualValues(t, 3, count(t, d.DB, "async_group", "reference = ?", "r"))
		})
	}
}
