package async_test

import (
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// The group index is partial where the database has partial indexes (every
// claim and completion writes a new row version into each index on
// Postgres), and migrating a table made by an earlier version replaces its
// full group index and drops the unused name index.
func TestJobIndexes(t *testing.T) {
	for _, kind := range dbKinds {
		t.Run(kind, func(t *testing.T) {
			dsn := createDatabase(t, kind)
			db := openDB(t, kind, dsn, nil)
			// The table as earlier versions left it.
			require.NoError(t, db.AutoMigrate(&async.Job{}))
			for _, s := range []string{
				"CREATE INDEX async_job_name ON async_job (name)",
				"CREATE INDEX async_job_identity ON async_job (identity)",
				"CREATE INDEX async_job_group ON async_job (group_id)",
			} {
				require.NoError(t, db.Exec(s).Error)
			}
			require.NoError(t, db.Use(&async.Plugin{Logger: testLogger()}))
			// Migrating again (another process starting) changes nothing.
			db = openDB(t, kind, dsn, nil)
			require.NoError(t, db.Use(&async.Plugin{Logger: testLogger()}), "migrating again")

			want := []string{"async_job_group_member", "async_job_identity", "async_job_pending"}
			if kind == "mysql" {
				want = []string{"async_job_group", "async_job_identity", "async_job_pending"}
			}
			assert.Equal(t, want, jobIndexes(t, db, kind))
			if kind == "mysql" {
				return
			}
			// The library's lookups use them, once the table has rows.
			jobs := make([]async.Job, 2000)
			for i := range jobs {
				jobs[i] = async.Job{Name: "t", Queue: "default", Args: "[]", Kwargs: "{}", Meta: "{}", Priority: 5,
					Identity: fmt.Sprintf("%040d", i), Added: time.Now()}
			}
			require.NoError(t, db.CreateInBatches(jobs, 500).Error)
			if kind == "postgres" {
				require.NoError(t, db.Exec("ANALYZE async_job").Error)
			}
			pendingIdentity := "SELECT id FROM async_job WHERE identity = 'x' AND async_job.executed IS NULL AND async_job.cancelled IS NULL AND async_job.failed IS NULL"
			assert.Contains(t, plan(t, db, kind, pendingIdentity), "async_job_identity")
			assert.Contains(t, plan(t, db, kind, "SELECT COUNT(*) FROM async_job WHERE group_id = 1"), "async_job_group_member")
			// The claim's test for a group's final job (claimConds), with
			// many pending jobs: its subquery reads the group's members only.
			finalWaits := "SELECT j.id FROM async_job j WHERE j.group_id IS NULL OR NOT EXISTS (SELECT 1 FROM async_group g JOIN async_job o ON o.group_id = g.id" +
				" WHERE g.id = j.group_id AND g.final_id = j.id AND o.id <> j.id AND o.executed IS NULL AND o.cancelled IS NULL AND o.failed IS NULL)"
			assert.Contains(t, plan(t, db, kind, finalWaits), "async_job_group_member")
		})
	}
}

// jobIndexes lists async_job's secondary indexes by name.
func jobIndexes(t *testing.T, db *gorm.DB, kind string) []string {
	t.Helper()
	q := map[string]string{
		"postgres": "SELECT indexname FROM pg_indexes WHERE tablename = 'async_job' AND indexname <> 'async_job_pkey'",
		"sqlite":   "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'async_job' AND name NOT LIKE 'sqlite_%'",
		"mysql":    "SELECT DISTINCT index_name FROM information_schema.statistics WHERE table_schema = DATABASE() AND table_name = 'async_job' AND index_name <> 'PRIMARY'",
	}[kind]
	var names []string
	require.NoError(t, db.Raw(q).Scan(&names).Error)
	sort.Strings(names)
	return names
}

// plan is the query plan of q as text; on Postgres with sequential scans
// priced out, so that a usable index shows however small the table.
func plan(t *testing.T, db *gorm.DB, kind, q string) string {
	t.Helper()
	if kind != "postgres" {
		return sqlitePlan(t, db, q)
	}
	var lines []string
	err := db.Transaction(func(tx *gorm.DB) error {
		if err := tx.Exec("SET LOCAL enable_seqscan = off").Error; err != nil {
			return err
		}
		return tx.Raw("EXPLAIN " + q).Scan(&lines).Error
	})
	require.NoError(t, err)
	return strings.Join(lines, "\n")
}

// sqlitePlan is SQLite's EXPLAIN QUERY PLAN of q: the detail lines.
func sqlitePlan(t testing.TB, db *gorm.DB, q string, args ...any) string {
	t.Helper()
	rows, err := db.Raw("EXPLAIN QUERY PLAN "+q, args...).Rows()
	require.NoError(t, err)
	defer rows.Close()
	var lines []string
	for rows.Next() {
		var id, parent, notused int
		var detail string
		require.NoError(t, rows.Scan(&id, &parent, &notused, &detail))
		lines = append(lines, detail)
	}
	require.NoError(t, rows.Err())
	return strings.Join(lines, "\n")
}

// On Postgres the job table leaves room on its pages for claims' HOT
// updates (fillfactor 50), unless its owner set a fillfactor, which
// migrating keeps.
func TestJobTableFillfactor(t *testing.T) {
	d := newTestDB(t, "postgres", nil)
	reloptions := func() string {
		var s string
		require.NoError(t, d.DB.Raw("SELECT COALESCE(array_to_string(reloptions, ','), '') FROM pg_class WHERE oid = 'async_job'::regclass").Scan(&s).Error)
		return s
	}
	assert.Equal(t, "fillfactor=50", reloptions())
	require.NoError(t, d.DB.Exec("ALTER TABLE async_job SET (fillfactor = 80)").Error)
	db := openDB(t, "postgres", d.DSN, nil)
	require.NoError(t, db.Use(&async.Plugin{Logger: testLogger()}), "migrating again")
	assert.Equal(t, "fillfactor=80", reloptions(), "the owner's fillfactor is kept")
}
