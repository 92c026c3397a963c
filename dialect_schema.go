package async

import (
	"database/sql"
	"fmt"

	"gorm.io/gorm"
)

// The job table's schema beyond what GORM's models express: the
// pending-jobs index, secondary indexes, Postgres's notify trigger and
// fillfactor. Like dialect.go, it knows database names.

// notifyChannel is the Postgres channel a trigger on async_job notifies on
// every insert; the notification is delivered when the inserting transaction commits.
const notifyChannel = "async_job"

// secondaryIndexes are the job table's secondary indexes besides
// async_job_pending on Postgres and SQLite, and those of earlier versions
// they replace. On Postgres every new row version that is not a HOT update
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
var secondaryIndexes = []jobIndex{
	{name: "async_job_name", drop: true},
	{name: "async_job_identity", ddl: `CREATE INDEX IF NOT EXISTS async_job_identity ON async_job (identity)`},
	{name: "async_job_group", drop: true},
	{name: "async_job_group_member", ddl: `CREATE INDEX IF NOT EXISTS async_job_group_member ON async_job (group_id) WHERE group_id IS NOT NULL`},
}

// jobIndex is an index of async_job that migration creates with ddl where
// it is missing or, if drop, drops where it exists.
type jobIndex struct {
	name string
	ddl  string
	drop bool
}

// jobFillfactor leaves half of each page of async_job free on Postgres, for
// the row versions its claims write. A claim changes no indexed column, so
// with room on the row's page its update is a HOT update, which writes no
// index entry; on full pages (the default fillfactor, 100) almost every claim
// wrote a new entry into each of the job indexes, the pending one included.
// A completion changes the pending index's predicate columns and is never
// HOT. A fillfactor the table already has, set by its owner, is kept; it
// applies to rows inserted from then on.
const (
	hasFillfactor = `SELECT COUNT(*) FROM pg_class c, unnest(c.reloptions) o WHERE c.oid = 'async_job'::regclass AND o LIKE 'fillfactor=%'`
	jobFillfactor = `ALTER TABLE async_job SET (fillfactor = 50)`
)

// The notify trigger (Postgres): a statement trigger on async_job's
// inserts that calls async_job_notify. Its pg_trigger.tgtype, 4, is AFTER
// INSERT FOR EACH STATEMENT.
const (
	notifyFuncBody = ` BEGIN PERFORM pg_notify('` + notifyChannel + `', ''); RETURN NULL; END `
	notifyFunc     = `CREATE OR REPLACE FUNCTION async_job_notify() RETURNS trigger LANGUAGE plpgsql AS $$` + notifyFuncBody + `$$`
	hasNotifyFunc  = `SELECT COUNT(*) FROM pg_proc WHERE oid = to_regprocedure('async_job_notify()') AND prosrc = ?`
	notifyTrigger  = `CREATE TRIGGER async_job_notify AFTER INSERT ON async_job FOR EACH STATEMENT EXECUTE FUNCTION async_job_notify()`
	hasNotifyTrig  = `SELECT COUNT(*) FROM pg_trigger WHERE tgrelid = 'async_job'::regclass AND tgname = 'async_job_notify' AND tgtype = 4 AND tgfoid = to_regprocedure('async_job_notify()') AND tgenabled <> 'D'`
)

// extraSteps lists what the job table lacks of what GORM's models cannot
// express: the pending-jobs index, the secondary indexes, and on Postgres
// the notify trigger and the fillfactor. Each is found missing by a
// catalogue read, so that a current schema is migrated without DDL (see
// migrate).
func (d *dialect) extraSteps(db *gorm.DB) ([]schemaStep, error) {
	var steps []schemaStep
	m := db.Migrator()
	exec := func(what, q string) {
		steps = append(steps, schemaStep{what, func(db *gorm.DB) error { return db.Exec(q).Error }})
	}
	index := func(ix jobIndex) {
		switch has := m.HasIndex(&Job{}, ix.name); {
		case ix.drop && has:
			exec("drop index "+ix.name, "DROP INDEX IF EXISTS "+ix.name)
		case !ix.drop && !has:
			exec("create index "+ix.name, ix.ddl)
		}
	}
	missing := func(q string, args ...any) (bool, error) {
		var n int64
		err := db.Raw(q, args...).Scan(&n).Error
		return n == 0, err
	}
	switch d.kind {
	case kindPostgres:
		noFunc, err := missing(hasNotifyFunc, notifyFuncBody)
		if err != nil {
			return nil, err
		}
		if noFunc {
			exec("notify function", notifyFunc)
		}
		noTrig, err := missing(hasNotifyTrig)
		if err != nil {
			return nil, err
		}
		if noTrig || noFunc {
			// Replaced in one transaction: no insert commits meanwhile
			// without a notification.
			steps = append(steps, schemaStep{"notify trigger", func(db *gorm.DB) error {
				return db.Transaction(func(tx *gorm.DB) error {
					if err := tx.Exec(`DROP TRIGGER IF EXISTS async_job_notify ON async_job`).Error; err != nil {
						return err
					}
					return tx.Exec(notifyTrigger).Error
				})
			}})
		}
		// A claim reads it in two ranges per priority (claimIDs), each in
		// order, and stops at its LIMIT.
		index(jobIndex{name: "async_job_pending", ddl: `CREATE INDEX IF NOT EXISTS async_job_pending ON async_job (priority DESC, scheduled, id) WHERE executed IS NULL AND cancelled IS NULL AND failed IS NULL`})
		noFill, err := missing(hasFillfactor)
		if err != nil {
			return nil, err
		}
		if noFill {
			exec("fillfactor", jobFillfactor)
		}
		for _, ix := range secondaryIndexes {
			index(ix)
		}
	case kindSQLite:
		// As on Postgres; SQLite sorts NULLs first, so the expression
		// column puts the unscheduled jobs of a priority after the
		// scheduled ones.
		index(jobIndex{name: "async_job_pending", ddl: `CREATE INDEX IF NOT EXISTS async_job_pending ON async_job (priority DESC, (scheduled IS NULL), scheduled, id) WHERE executed IS NULL AND cancelled IS NULL AND failed IS NULL`})
		for _, ix := range secondaryIndexes {
			index(ix)
		}
	case kindMySQL:
		// No partial indexes: pending rows are those NULL in the first three
		// columns. A claim reads it one priority at a time, in two exact
		// ranges, ascending within the priority (selectClaimable). (DESC is
		// honoured from MySQL 8 and MariaDB 10.8; the claim does not depend
		// on it.)
		for _, ix := range []jobIndex{
			{name: "async_job_pending", ddl: `CREATE INDEX async_job_pending ON async_job (executed, cancelled, failed, priority DESC, scheduled, id)`},
			{name: "async_job_identity", ddl: `CREATE INDEX async_job_identity ON async_job (identity)`},
			{name: "async_job_group", ddl: `CREATE INDEX async_job_group ON async_job (group_id)`},
		} {
			index(ix)
		}
		if m.HasIndex(&Job{}, "async_job_name") {
			exec("drop index async_job_name", `DROP INDEX async_job_name ON async_job`)
		}
	}
	return steps, nil
}

// pgMigrationLock is the key of the Postgres advisory lock that migrations
// hold ("asyncmig"); advisory locks are per database.
const pgMigrationLock = 0x6173796e636d6967

// mysqlMigrationLock names the MySQL/MariaDB lock (GET_LOCK) that
// migrations hold. Those locks are per server: the name carries the
// database's, hashed to fit their 64 characters.
const mysqlMigrationLock = "CONCAT('async_migrate:', MD5(DATABASE()))"

// migrationLockWait bounds how long a migration waits for another
// process's (MySQL and MariaDB; Postgres waits as long as it takes).
const migrationLockWait = 10 * 60 // seconds

// migrationLock runs fn on one connection of db while it holds the
// database's migration lock, so that one process migrates at a time:
// a Postgres advisory lock, a MySQL named lock, SQLite's write lock
// (fn then runs in that transaction). A pool that has no *sql.DB (a
// resolver's) migrates without it.
func (d *dialect) migrationLock(db *gorm.DB, fn func(db *gorm.DB) error) error {
	if _, err := db.DB(); err != nil {
		return fn(db) // a pool with no *sql.DB to take a connection from: no lock
	}
	return db.Connection(func(pinned *gorm.DB) error {
		conn := pinned.Session(&gorm.Session{NewDB: true}) // statements that do not share one Statement
		switch d.kind {
		case kindPostgres:
			if err := conn.Exec("SELECT pg_advisory_lock(?)", int64(pgMigrationLock)).Error; err != nil {
				return fmt.Errorf("async: taking the migration lock: %w", err)
			}
			defer conn.Exec("SELECT pg_advisory_unlock(?)", int64(pgMigrationLock))
			return fn(conn)
		case kindMySQL:
			var got sql.NullInt64
			if err := conn.Raw("SELECT GET_LOCK("+mysqlMigrationLock+", ?)", migrationLockWait).Scan(&got).Error; err != nil {
				return fmt.Errorf("async: taking the migration lock: %w", err)
			}
			if got.Int64 != 1 {
				return fmt.Errorf("async: taking the migration lock: another process held it for %ds", migrationLockWait)
			}
			defer conn.Exec("SELECT RELEASE_LOCK(" + mysqlMigrationLock + ")")
			return fn(conn)
		}
		if err := conn.Exec("BEGIN IMMEDIATE").Error; err != nil {
			return fmt.Errorf("async: taking the migration lock: %w", err)
		}
		if err := fn(conn); err != nil {
			conn.Exec("ROLLBACK")
			return err
		}
		return conn.Exec("COMMIT").Error
	})
}
