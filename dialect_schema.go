package async

import (
	"fmt"

	"gorm.io/gorm"
)

// The job table's schema beyond what GORM's AutoMigrate expresses: the
// pending-jobs index, secondary indexes, Postgres's notify trigger and
// fillfactor. Like dialect.go, it knows database names.

// notifyChannel is the Postgres channel a trigger on async_job notifies on
// every insert; the notification is delivered when the inserting transaction commits.
const notifyChannel = "async_job"

// secondaryIndexes creates the job table's secondary indexes besides
// async_job_pending on Postgres and SQLite, replacing those of earlier
// versions. On Postgres every new row version that is not a HOT update
// (every completion, and a claim on a full page: see jobFillfactor) writes
// an entry into each index, so group_id is indexed only for jobs in a group
// (most have none), and async_job_name, which earlier versions created and
// no query of the library uses, is dropped. identity stays a full index:
// made partial on pending jobs, it cost group commit half its throughput
// when many pending jobs share an identity (the same task and arguments),
// as each claim's new entry then lands among thousands of duplicates; with
// claims HOT (jobFillfactor) it was measured again and one strict case fell
// to a fifth of its throughput (919 against 4,684-5,015 no-op jobs/s). MySQL
// has no partial indexes; InnoDB rewrites a secondary index entry only when
// its columns change, so a full index costs little there.
var secondaryIndexes = []string{
	`DROP INDEX IF EXISTS async_job_name`,
	`CREATE INDEX IF NOT EXISTS async_job_identity ON async_job (identity)`,
	`DROP INDEX IF EXISTS async_job_group`,
	`CREATE INDEX IF NOT EXISTS async_job_group_member ON async_job (group_id) WHERE group_id IS NOT NULL`,
}

// jobFillfactor leaves half of each page of async_job free on Postgres, for
// the row versions its claims write. A claim changes no indexed column, so
// with room on the row's page its update is a HOT update, which writes no
// index entry; on full pages (the default fillfactor, 100) almost every claim
// wrote a new entry into each of the job indexes, the pending one included.
// A completion changes the pending index's predicate columns and is never
// HOT. A fillfactor the table already has, set by its owner, is kept; it
// applies to rows inserted from then on.
const jobFillfactor = `DO $$ BEGIN
IF NOT EXISTS (SELECT 1 FROM pg_class c, unnest(c.reloptions) o WHERE c.oid = 'async_job'::regclass AND o LIKE 'fillfactor=%') THEN
ALTER TABLE async_job SET (fillfactor = 50);
END IF; END $$`

// migrateExtras creates what GORM's AutoMigrate cannot express.
func (d *dialect) migrateExtras(db *gorm.DB) error {
	var stmts []string
	switch d.kind {
	case kindPostgres:
		stmts = []string{
			`CREATE OR REPLACE FUNCTION async_job_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('` + notifyChannel + `', ''); RETURN NULL; END $$`,
			`DROP TRIGGER IF EXISTS async_job_notify ON async_job`,
			`CREATE TRIGGER async_job_notify AFTER INSERT ON async_job FOR EACH STATEMENT EXECUTE FUNCTION async_job_notify()`,
			// A claim reads it in two ranges per priority (claimIDs), each in
			// order, and stops at its LIMIT.
			`CREATE INDEX IF NOT EXISTS async_job_pending ON async_job (priority DESC, scheduled, id) WHERE executed IS NULL AND cancelled IS NULL AND failed IS NULL`,
			jobFillfactor,
		}
		stmts = append(stmts, secondaryIndexes...)
	case kindSQLite:
		// As on Postgres; SQLite sorts NULLs first, so the expression
		// column puts the unscheduled jobs of a priority after the
		// scheduled ones.
		stmts = []string{
			`CREATE INDEX IF NOT EXISTS async_job_pending ON async_job (priority DESC, (scheduled IS NULL), scheduled, id) WHERE executed IS NULL AND cancelled IS NULL AND failed IS NULL`,
		}
		stmts = append(stmts, secondaryIndexes...)
	case kindMySQL:
		// No partial indexes: pending rows are those NULL in the first three
		// columns. A claim reads it one priority at a time, in two exact
		// ranges, ascending within the priority (selectClaimable). (DESC is
		// honoured from MySQL 8 and MariaDB 10.8; the claim does not depend
		// on it.)
		m := db.Migrator()
		if !m.HasIndex(&Job{}, "async_job_pending") {
			stmts = append(stmts, `CREATE INDEX async_job_pending ON async_job (executed, cancelled, failed, priority DESC, scheduled, id)`)
		}
		if !m.HasIndex(&Job{}, "async_job_identity") {
			stmts = append(stmts, `CREATE INDEX async_job_identity ON async_job (identity)`)
		}
		if !m.HasIndex(&Job{}, "async_job_group") {
			stmts = append(stmts, `CREATE INDEX async_job_group ON async_job (group_id)`)
		}
		if m.HasIndex(&Job{}, "async_job_name") {
			stmts = append(stmts, `DROP INDEX async_job_name ON async_job`)
		}
	}
	for _, s := range stmts {
		if err := db.Exec(s).Error; err != nil {
			return fmt.Errorf("async: migrating %s: %w", d.name, err)
		}
	}
	return nil
}
