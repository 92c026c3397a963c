package async

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/stdlib"
	"gorm.io/gorm"
)

// Bulk insert of new jobs (ScheduleMany), per database. With dialect.go, the
// only code that knows database names.
//
// The statements write the same 19 columns, with the same values, as GORM's
// Create of a Job: the eleven a new job can set are bound parameters, the
// others (result, started, executed, cancelled, failed, attempts,
// locked_until, locked_by) are literals of their zero values. They run on the
// caller's connection or transaction (db.Statement.ConnPool), bypassing
// GORM's statement building, which cost more than the insert itself.

// jobInsertColumns are the columns GORM's Create of a Job writes, in order.
const jobInsertColumns = "name, queue, args, kwargs, meta, result, priority, identity, added, scheduled, " +
	"started, executed, cancelled, failed, attempts, max_attempts, locked_until, locked_by, group_id"

// jobInsertParams is how many bound parameters one row of a multi-row
// INSERT takes: the columns that jobRowValues leaves as placeholders.
const jobInsertParams = 11

// jobRowValues are one row's values for jobInsertColumns: "?" is a bound
// parameter, in the order insertValues appends the values.
const jobRowValues = "(?, ?, ?, ?, ?, '', ?, ?, ?, ?, NULL, NULL, NULL, NULL, 0, ?, NULL, '', ?)"

// insertBatchBytes bounds the job data (name, arguments, meta) one INSERT
// carries, so a statement stays well under MySQL's max_allowed_packet
// (4 MiB by default on MySQL 5.7) whatever the jobs' arguments.
const insertBatchBytes = 1 << 20

// pgUnnestRows is the most rows one Postgres unnest INSERT carries.
const pgUnnestRows = 10000

// pgInsertJobs inserts the rows of eleven parallel arrays, one statement for
// any number of rows: pgx sends the arrays in binary. The ids come back in
// any order, but nextval runs on the rows in ORDER BY order, so sorted ids
// match the arrays' order (see insertJobs).
const pgInsertJobs = "INSERT INTO " + jobTable + " (" + jobInsertColumns + ") " +
	"SELECT u.name, u.queue, u.args, u.kwargs, u.meta, '', u.priority, u.identity, u.added, u.scheduled, " +
	"NULL, NULL, NULL, NULL, 0, u.max_attempts, NULL, '', u.group_id " +
	"FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[], " +
	"$8::timestamptz[], $9::timestamptz[], $10::bigint[], $11::bigint[]) " +
	"WITH ORDINALITY AS u(name, queue, args, kwargs, meta, priority, identity, added, scheduled, max_attempts, group_id, ord) " +
	"ORDER BY u.ord RETURNING id"

// insertReturning reports whether an INSERT can return the new ids
// (RETURNING): Postgres, MariaDB from 10.5, SQLite from 3.35. GORM's Create
// uses it on the same servers.
func (d *dialect) insertReturning() bool {
	if d.kind == kindMySQL {
		major, minor := parseVersion(d.version)
		return strings.Contains(strings.ToLower(d.version), "mariadb") && (major > 10 || major == 10 && minor >= 5)
	}
	return d.updateReturning()
}

// insertMethod is how a bulk insert writes its rows and learns their ids.
type insertMethod int

const (
	// insertUnnest: Postgres with pgx, pgInsertJobs.
	insertUnnest insertMethod = iota + 1
	// insertValuesReturning: a multi-row INSERT ... VALUES ... RETURNING id.
	insertValuesReturning
	// insertValuesLastID: a multi-row INSERT ... VALUES and the last insert id.
	insertValuesLastID
)

// insertMethod picks how this database inserts a number (rows) of new jobs;
// pgx tells whether its driver is pgx's. One row (Schedule) on Postgres is
// a plain INSERT ... VALUES ... RETURNING: unnest's arrays gain nothing
// there.
func (d *dialect) insertMethod(pgx bool, rows int) insertMethod {
	switch {
	case d.kind == kindPostgres && pgx && rows > 1:
		return insertUnnest
	case d.insertReturning():
		return insertValuesReturning
	}
	return insertValuesLastID
}

// insertJobs inserts new jobs (built by buildJob) through db, in as few
// statements as the database allows, and sets their IDs. m is the method, or
// zero for this database's best. It does not begin a transaction:
// ScheduleMany runs it in one; Schedule's one row is one statement. Once
// inserted, the jobs wake this process's idle workers (jobsInserted).
func (p *Plugin) insertJobs(db *gorm.DB, jobs []Job, m insertMethod) error {
	if m == 0 {
		m = p.dialect.insertMethod(p.pgxDriver(), len(jobs))
	}
	if err := p.dialect.insertJobs(db, jobs, m); err != nil {
		return err
	}
	p.jobsInserted(db)
	return nil
}

// insertJobs inserts jobs with method m, in chunks.
//
// IDs: where the INSERT returns them, the ids of each statement are sorted and
// given to its rows in order: every database here draws auto-increment
// values for a statement's rows in the order they are inserted, which is the
// order of the VALUES list (or of the ORDER BY). Elsewhere, as GORM does,
// MySQL's LAST_INSERT_ID is the first row's id and the others follow it by
// the session's auto_increment_increment (InnoDB allocates a multi-row
// INSERT's values at once; the step is one unless a replication topology,
// such as Galera, set it; GORM assumes one), and SQLite's
// last_insert_rowid is the last row's id (a single writer: the rows get
// consecutive ids).
func (d *dialect) insertJobs(db *gorm.DB, jobs []Job, m insertMethod) error {
	for i := range jobs {
		if !newJobDefaults(&jobs[i]) {
			return fmt.Errorf("async: internal error: job %d has a column set that a bulk insert writes as a literal", i+1)
		}
	}
	maxRows := d.maxParams() / jobInsertParams
	if m == insertUnnest {
		maxRows = pgUnnestRows
	}
	for start := 0; start < len(jobs); {
		end := insertChunk(jobs, start, maxRows)
		var err error
		if m == insertUnnest {
			err = d.insertUnnest(db, jobs[start:end])
		} else {
			err = d.insertValues(db, jobs[start:end], m == insertValuesReturning)
		}
		if err != nil {
			return err
		}
		start = end
	}
	return nil
}

// newJobDefaults reports whether j's columns that jobRowValues writes as
// literals hold exactly those values.
func newJobDefaults(j *Job) bool {
	return j.ID == 0 && j.Result == "" && j.Started == nil && j.Executed == nil && j.Cancelled == nil &&
		j.Failed == nil && j.Attempts == 0 && j.LockedUntil == nil && j.LockedBy == ""
}

// insertChunk returns the end of the chunk of jobs that starts at start: at
// most maxRows rows and insertBatchBytes of job data, and at least one row.
func insertChunk(jobs []Job, start, maxRows int) int {
	end, size := start, 0
	for end < len(jobs) && end-start < maxRows {
		j := &jobs[end]
		size += len(j.Name) + len(j.Queue) + len(j.Args) + len(j.Kwargs) + len(j.Meta) + len(j.Identity) + 64
		if size > insertBatchBytes && end > start {
			break
		}
		end++
	}
	return end
}

// pgxDriver reports whether the plugin's connections are pgx's
// database/sql driver, which can bind Go slices as Postgres arrays.
func (p *Plugin) pgxDriver() bool {
	sqlDB, err := p.db.DB()
	if err != nil {
		return false
	}
	_, ok := sqlDB.Driver().(*stdlib.Driver)
	return ok
}

// insertUnnest inserts jobs on Postgres with pgInsertJobs.
func (d *dialect) insertUnnest(db *gorm.DB, jobs []Job) error {
	n := len(jobs)
	var (
		names, queues, args, kwargs, metas, idents = make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n)
		prios, maxes                               = make([]int64, n), make([]int64, n)
		added                                      = make([]time.Time, n)
		scheduled                                  = make([]*time.Time, n)
		groups                                     = make([]*int64, n)
	)
	for i := range jobs {
		j := &jobs[i]
		names[i], queues[i], args[i], kwargs[i], metas[i], idents[i] = j.Name, j.Queue, j.Args, j.Kwargs, j.Meta, j.Identity
		prios[i], maxes[i] = int64(j.Priority), int64(j.MaxAttempts)
		added[i], scheduled[i], groups[i] = j.Added, j.Scheduled, j.GroupID
	}
	return queryIDs(db, jobs, pgInsertJobs, names, queues, args, kwargs, metas, prios, idents, added, scheduled, maxes, groups)
}

// insertValues inserts jobs with one multi-row INSERT ... VALUES, reading
// their ids with RETURNING or else from the last insert id.
func (d *dialect) insertValues(db *gorm.DB, jobs []Job, returning bool) error {
	var b strings.Builder
	b.Grow(len("INSERT INTO  () VALUES  RETURNING id") + len(jobTable) + len(jobInsertColumns) + len(jobs)*(len(jobRowValues)+2+jobInsertParams*5))
	b.WriteString("INSERT INTO " + jobTable + " (" + jobInsertColumns + ") VALUES ")
	if d.kind == kindPostgres { // another driver than pgx: numbered placeholders
		k := 0
		for i := range jobs {
			if i > 0 {
				b.WriteString(", ")
			}
			for _, part := range strings.SplitAfter(jobRowValues, "?") {
				if strings.HasSuffix(part, "?") {
					k++
					b.WriteString(part[:len(part)-1])
					b.WriteByte('$')
					b.WriteString(strconv.Itoa(k))
				} else {
					b.WriteString(part)
				}
			}
		}
	} else {
		b.WriteString(jobRowValues)
		for range len(jobs) - 1 {
			b.WriteString(", " + jobRowValues)
		}
	}
	if returning {
		b.WriteString(" RETURNING id")
	}
	vals := make([]any, 0, len(jobs)*jobInsertParams)
	for i := range jobs {
		j := &jobs[i]
		var scheduled, group any
		if j.Scheduled != nil {
			scheduled = *j.Scheduled
		}
		if j.GroupID != nil {
			group = *j.GroupID
		}
		vals = append(vals, j.Name, j.Queue, j.Args, j.Kwargs, j.Meta, int64(j.Priority), j.Identity, j.Added, scheduled, int64(j.MaxAttempts), group)
	}
	if returning {
		return queryIDs(db, jobs, b.String(), vals...)
	}
	step := int64(1)
	if d.kind == kindMySQL && len(jobs) > 1 {
		// A multi-row INSERT's ids are first, first+step, ...: the step is
		// the session's auto_increment_increment, 1 unless a replication
		// topology (Galera, group replication) set it.
		if err := db.Statement.ConnPool.QueryRowContext(db.Statement.Context, "SELECT @@auto_increment_increment").Scan(&step); err != nil {
			return fmt.Errorf("async: reading auto_increment_increment: %w", err)
		}
	}
	return execIDs(db, jobs, b.String(), d.kind == kindSQLite, step, vals...)
}

// queryIDs runs an INSERT ... RETURNING id of len(jobs) rows and gives the
// sorted ids to jobs in order.
func queryIDs(db *gorm.DB, jobs []Job, query string, args ...any) (err error) {
	begin := time.Now()
	ids := make([]int64, 0, len(jobs))
	defer func() { traceInsert(db, begin, query, int64(len(ids)), err) }()
	rows, err := db.Statement.ConnPool.QueryContext(db.Statement.Context, query, args...)
	if err != nil {
		return err
	}
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			rows.Close()
			return err
		}
		ids = append(ids, id)
	}
	if err := errors.Join(rows.Err(), rows.Close()); err != nil {
		return err
	}
	if len(ids) != len(jobs) {
		return fmt.Errorf("async: inserting %d jobs returned %d ids", len(jobs), len(ids))
	}
	slices.Sort(ids)
	for i := range jobs {
		jobs[i].ID = ids[i]
	}
	return nil
}

// execIDs runs an INSERT of len(jobs) rows and sets the ids from the last
// insert id: the last row's when lastIsLast (SQLite), else the first's; the
// rows' ids are step apart.
func execIDs(db *gorm.DB, jobs []Job, query string, lastIsLast bool, step int64, args ...any) (err error) {
	begin := time.Now()
	var n int64
	defer func() { traceInsert(db, begin, query, n, err) }()
	res, err := db.Statement.ConnPool.ExecContext(db.Statement.Context, query, args...)
	if err != nil {
		return err
	}
	if n, err = res.RowsAffected(); err != nil {
		return err
	}
	if n != int64(len(jobs)) {
		return fmt.Errorf("async: inserting %d jobs inserted %d rows", len(jobs), n)
	}
	id, err := res.LastInsertId()
	if err != nil {
		return err
	}
	if lastIsLast {
		id -= (n - 1) * step
	}
	for i := range jobs {
		jobs[i].ID = id + int64(i)*step
	}
	return nil
}

// traceInsert reports a bulk insert to GORM's logger, as GORM reports the
// statements it runs (without the bound values).
func traceInsert(db *gorm.DB, begin time.Time, query string, rows int64, err error) {
	if db.Logger == nil {
		return
	}
	db.Logger.Trace(db.Statement.Context, begin, func() (string, int64) {
		if len(query) > 400 {
			query = query[:400] + "..."
		}
		return query, rows
	}, err)
}
