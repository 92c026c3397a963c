package async

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/stdlib"
	"gorm.io/gorm"
)

// This file and the other dialect_*.go files are the only code that knows
// database names and their SQL quirks.

type dialectKind int

const (
	kindPostgres dialectKind = iota + 1
	kindMySQL
	kindSQLite
)

// dialect describes what the connected server can do.
type dialect struct {
	kind    dialectKind
	name    string // "postgres", "mysql" or "sqlite", as GORM names it
	version string // server version string
	// skipLocked is true where claims use FOR UPDATE SKIP LOCKED.
	skipLocked bool
	// singleWriter is true for SQLite: one write transaction at a time, so the
	// plugin serialises its own writers in-process.
	singleWriter bool
	// busyWait is how long an entry point (Retry, Deschedule, FlushQueue,
	// Job.Execute) waits for this process's SQLite writer (writerWait).
	busyWait time.Duration
	// pipeline is true on Postgres through pgx (dialect_pgx.go).
	pipeline bool
	// txns, where set, holds runs' transactions on connections, BEGIN and
	// COMMIT travelling with a run's first and last statements: pgx
	// pipelines on Postgres, compound statements on MariaDB.
	txns connTxns
}

// DialectInfo describes the database the plugin detected.
type DialectInfo struct {
	// Name is "postgres", "mysql" or "sqlite".
	Name string `json:"name"`
	// Version is the server version string.
	Version string `json:"version"`
	// SkipLocked reports whether claims use FOR UPDATE SKIP LOCKED.
	SkipLocked bool `json:"skip-locked"`
	// Locking describes the claim strategy in words.
	Locking string `json:"locking"`
	// ClockOffsetSeconds is the database's clock minus this process's
	// (db.NowFunc), measured by Health (nil elsewhere). Leases and schedules
	// compare times that every process writes from its own clock, so the
	// machines sharing a database must agree to well within the lease.
	ClockOffsetSeconds *float64 `json:"clock-offset-seconds,omitempty"`
}

func (d *dialect) info() DialectInfo {
	locking := "FOR UPDATE SKIP LOCKED"
	switch {
	case d.singleWriter:
		locking = "single writer (SQLite database lock, serialised in-process)"
	case !d.skipLocked:
		locking = "FOR UPDATE (server lacks SKIP LOCKED: claims queue behind running jobs)"
	}
	return DialectInfo{Name: d.name, Version: d.version, SkipLocked: d.skipLocked, Locking: locking}
}

var versionRE = regexp.MustCompile(`^(\d+)\.(\d+)`)

func detectDialect(db *gorm.DB) (*dialect, error) {
	name := db.Dialector.Name()
	d := &dialect{name: name}
	switch name {
	case "postgres":
		d.kind = kindPostgres
		if err := db.Raw("SHOW server_version").Scan(&d.version).Error; err != nil {
			return nil, fmt.Errorf("async: reading postgres version: %w", err)
		}
		major, _ := parseVersion(d.version)
		d.skipLocked = major >= 10 || major == 9 && versionMinor(d.version) >= 5
	case "mysql":
		d.kind = kindMySQL
		if err := db.Raw("SELECT VERSION()").Scan(&d.version).Error; err != nil {
			return nil, fmt.Errorf("async: reading mysql version: %w", err)
		}
		major, minor := parseVersion(d.version)
		if strings.Contains(strings.ToLower(d.version), "mariadb") {
			d.skipLocked = major > 10 || major == 10 && minor >= 6
		} else {
			d.skipLocked = major >= 8
		}
	case "sqlite", "sqlite3":
		d.kind = kindSQLite
		d.name = "sqlite"
		d.singleWriter = true
		if err := db.Raw("SELECT sqlite_version()").Scan(&d.version).Error; err != nil {
			return nil, fmt.Errorf("async: reading sqlite version: %w", err)
		}
		var busyMS int64
		if err := db.Raw("PRAGMA busy_timeout").Scan(&busyMS).Error; err != nil {
			return nil, fmt.Errorf("async: reading sqlite busy_timeout: %w", err)
		}
		d.busyWait = writerWait(time.Duration(busyMS) * time.Millisecond)
	default:
		return nil, errorf(ErrUnsupportedDialect, "%q (supported: postgres, mysql, sqlite)", name)
	}
	return d, nil
}

func parseVersion(v string) (int, int) {
	m := versionRE.FindStringSubmatch(v)
	if m == nil {
		return 0, 0
	}
	a, _ := strconv.Atoi(m[1])
	b, _ := strconv.Atoi(m[2])
	return a, b
}

func versionMinor(v string) int { _, b := parseVersion(v); return b }

// useConnTxns decides pipeline and txns once the plugin knows its pool
// (nil when the pool is not a plain *sql.DB). It returns why MariaDB's
// compound statements are not used on a server that has them, or "".
func (d *dialect) useConnTxns(db *gorm.DB, sqlDB *sql.DB) (why string) {
	d.pipeline = d.kind == kindPostgres && usesPgx(sqlDB)
	if d.pipeline {
		d.txns = pgxTxns{}
		return ""
	}
	m, why := mariaBlocksFor(db, d, sqlDB)
	if m != nil {
		d.txns = m
	}
	return why
}

// prepareHot reports whether the library's hot-path statements should be
// prepared once per connection (hotsql.go). MySQL's driver otherwise
// prepares, runs and closes every statement with arguments: two round trips
// instead of one. SQLite otherwise compiles every statement anew on every
// execution: with modernc.org/sqlite (and drivers built on it) a prepared
// statement keeps its compiled program, which halves a job's CPU. (Drivers
// that compile at each execution anyway, such as glebarez/go-sqlite, lose
// nothing by it.) pgx caches prepared statements by itself.
func (d *dialect) prepareHot() bool { return d.kind == kindMySQL || d.kind == kindSQLite }

// fence starts job's run at now: it re-checks the claim (id, locked_by,
// attempts, still pending) and locks the job's row until the job's
// transaction ends, returning the statement and its arguments; it affects
// (or returns) one row if the claim holds. A locking read writes no new row
// version. SQLite, which has no row locks, takes the database's write lock
// with an UPDATE that changes nothing. MariaDB's compound statements
// (dialect_maria.go) write the run's start time instead: an UPDATE's count
// comes back in the statement's OK packet, where a read's row would be a
// result set of its own, which costs the server and the client more than
// the write (see mariaTxns.commit).
func (d *dialect) fence(job *Job, now time.Time) (string, []any) {
	const where = " WHERE id = ? AND locked_by = ? AND attempts = ? AND " + stillPending
	switch {
	case d.singleWriter:
		return "UPDATE " + jobTable + " SET locked_by = locked_by" + where, []any{job.ID, job.LockedBy, job.Attempts}
	case d.fenceWrites():
		return "UPDATE " + jobTable + " SET started = ?" + where, []any{now, job.ID, job.LockedBy, job.Attempts}
	}
	return "SELECT id FROM " + jobTable + where + " FOR UPDATE", []any{job.ID, job.LockedBy, job.Attempts}
}

// fenceWrites reports whether fence writes the start time: on MariaDB with
// compound statements.
func (d *dialect) fenceWrites() bool {
	_, ok := d.txns.(*mariaTxns)
	return ok
}

// questionMarks reports whether the driver takes ? placeholders as they
// are; on Postgres GORM rewrites them into $1, $2, ...
func (d *dialect) questionMarks() bool { return d.kind != kindPostgres }

// lockClause is appended to the claim's SELECT.
func (d *dialect) lockClause() string {
	switch {
	case d.singleWriter:
		return "" // the write lock of the claim transaction serialises claims
	case d.skipLocked:
		return " FOR UPDATE SKIP LOCKED"
	default:
		return " FOR UPDATE"
	}
}

// updateReturning reports whether a claim can be one UPDATE ... RETURNING
// statement (Postgres; SQLite since 3.35). MySQL and MariaDB cannot return
// rows from an UPDATE.
func (d *dialect) updateReturning() bool {
	switch d.kind {
	case kindPostgres:
		return true
	case kindSQLite:
		major, minor := parseVersion(d.version)
		return major > 3 || major == 3 && minor >= 35
	}
	return false
}

// timeParam is a bound time parameter where the statement gives it no type
// (a CASE branch): Postgres must be told.
func (d *dialect) timeParam() string {
	if d.kind == kindPostgres {
		return "CAST(? AS TIMESTAMPTZ)"
	}
	return "?"
}

// completeAllSQL marks a group-commit batch executed, only where each claim
// still holds (groupcommit.go). Through pgx the jobs' values travel as four
// arrays joined to the table by id: one statement text for every batch
// size, which Postgres plans once per connection, where the CASE form's
// text changes with the batch size and took a plan of about 0.7 ms at each
// execution, and ran in nearly twice the time for 64 jobs.
func (d *dialect) completeAllSQL(jobs []*Job, starts []time.Time, results []string, done time.Time) (string, []any) {
	if d.pipeline {
		return completeAllArraysSQL(jobs, starts, results, done)
	}
	return completeAllCaseSQL(jobs, starts, results, done, d.timeParam())
}

// lazyCommitFrom, added to an UPDATE run on its own (autocommit), lets its
// commit return before its WAL is flushed to disk: set_config(..., true)
// lasts for the statement's implicit transaction, and the commit reads the
// setting. Claims use it on Postgres: a claim lost in a server crash only
// makes its jobs claimable again, and the durable commit of any later job
// flushes the claims before it. It saves the round trips of BEGIN, SET
// LOCAL and COMMIT. MySQL has no per-transaction equivalent.
func (d *dialect) lazyCommitFrom() string {
	if d.kind == kindPostgres {
		return " FROM (SELECT set_config('synchronous_commit', 'off', true)) AS lazy_commit"
	}
	return ""
}

// maxParams is the most bound parameters one statement may carry.
func (d *dialect) maxParams() int {
	if d.kind == kindSQLite {
		// SQLite allows 32766, but the pure-Go driver binds parameters in
		// quadratic time: short statements are much faster.
		return 999
	}
	return 65535 // Postgres and MySQL: a 16-bit count
}

// idChunk is how many ids one IN list of the library's maintenance
// statements (cleanup, deschedule, estimates) carries: well under every
// database's parameter limit (maxParams), and short to bind on SQLite.
const idChunk = 500

// beginWrite makes a transaction take the database's write lock first. On
// SQLite a transaction that reads and then writes fails at once with
// SQLITE_BUSY_SNAPSHOT when another connection committed in between; taking
// the write lock up front makes it wait (busy_timeout) instead.
func (d *dialect) beginWrite(tx *gorm.DB) error {
	if !d.singleWriter {
		return nil
	}
	return tx.Exec(d.beginWriteSQL()).Error
}

// beginWriteSQL is beginWrite's statement, or "" where none is needed.
func (d *dialect) beginWriteSQL() string {
	if !d.singleWriter {
		return ""
	}
	return "UPDATE " + lockTable + " SET owner = owner WHERE 1 = 0"
}

// claimTxOptions avoids InnoDB gap locks: under REPEATABLE READ a locking
// range scan would block inserts (Schedule) into the scanned gaps.
func (d *dialect) claimTxOptions() *sql.TxOptions {
	if d.kind == kindMySQL {
		return &sql.TxOptions{Isolation: sql.LevelReadCommitted}
	}
	return nil
}

// notifySQL wakes other processes' listening workers (Postgres), for jobs
// made runnable by an UPDATE, which the insert trigger does not see; ""
// elsewhere.
func (d *dialect) notifySQL() string {
	if d.kind == kindPostgres {
		return "SELECT pg_notify('" + notifyChannel + "', '')"
	}
	return ""
}

// canListen reports whether listen can deliver commit-time notifications.
func (d *dialect) canListen() bool { return d.kind == kindPostgres }

// listen holds one pooled connection in LISTEN and calls wake for every
// notification until ctx ends. ready is called once the LISTEN is in place.
func (d *dialect) listen(ctx context.Context, sqlDB *sql.DB, ready, wake func()) error {
	conn, err := sqlDB.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.Raw(func(dc any) error {
		sc, ok := dc.(*stdlib.Conn)
		if !ok {
			return fmt.Errorf("async: postgres driver connection is %T, not pgx: LISTEN unavailable", dc)
		}
		pc := sc.Conn()
		if _, err := pc.Exec(ctx, "LISTEN "+notifyChannel); err != nil {
			return fmt.Errorf("async: LISTEN: %w (%w)", err, driver.ErrBadConn)
		}
		ready()
		for {
			if _, err := pc.WaitForNotification(ctx); err != nil {
				// The connection still listens (or is broken): never return
				// it to the pool.
				if ctx.Err() != nil {
					return driver.ErrBadConn
				}
				return fmt.Errorf("async: listening: %w (%w)", err, driver.ErrBadConn)
			}
			wake()
		}
	})
}

// namePrefix is an SQL condition, with its one argument, that the task name
// in col starts with prefix, literally and case-sensitively (task names are
// Go names). LIKE ignores ASCII case on SQLite and under MySQL's default
// collations, so MySQL compares the pattern in binary and SQLite uses GLOB.
func (d *dialect) namePrefix(col, prefix string) (string, any) {
	switch d.kind {
	case kindSQLite:
		return col + " GLOB ?", globPrefix(prefix)
	case kindMySQL:
		return col + " LIKE CAST(? AS BINARY)" + likeEscape, likePrefix(prefix)
	default:
		return col + " LIKE ?" + likeEscape, likePrefix(prefix)
	}
}

// likePrefix makes a LIKE pattern that matches prefix literally; the escape
// character is '!' because backslash means different things to MySQL and the others.
func likePrefix(prefix string) string {
	r := strings.NewReplacer("!", "!!", "%", "!%", "_", "!_")
	return r.Replace(prefix) + "%"
}

const likeEscape = " ESCAPE '!'"

// globPrefix makes an SQLite GLOB pattern that matches prefix literally.
func globPrefix(prefix string) string {
	r := strings.NewReplacer("*", "[*]", "?", "[?]", "[", "[[]")
	return r.Replace(prefix) + "*"
}

// secondsBetween is an SQL expression for the seconds from the time column
// (or expression) from to the time to, whole days included, as a float.
// SQLite's julianday keeps about a millisecond of precision.
func (d *dialect) secondsBetween(from, to string) string {
	switch d.kind {
	case kindPostgres:
		return "CAST(EXTRACT(EPOCH FROM (" + to + " - " + from + ")) AS DOUBLE PRECISION)"
	case kindMySQL:
		return "(TIMESTAMPDIFF(MICROSECOND, " + from + ", " + to + ") / 1000000.0)"
	default:
		return "((julianday(" + to + ") - julianday(" + from + ")) * 86400.0)"
	}
}

// epochSQL reads the database's clock: seconds since the Unix epoch, with
// their fraction (on SQLite, the clock of this host).
func (d *dialect) epochSQL() string {
	switch d.kind {
	case kindPostgres:
		return "SELECT extract(epoch FROM clock_timestamp())::float8"
	case kindMySQL:
		return "SELECT UNIX_TIMESTAMP(NOW(6))"
	}
	return "SELECT (julianday('now') - 2440587.5) * 86400.0"
}
