package async

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mysqldrv "github.com/go-sql-driver/mysql"
	gormmysql "gorm.io/driver/mysql"
	"gorm.io/gorm"
)

// MariaDB: a run's START TRANSACTION travels with its first statement and
// its COMMIT with its last, inside anonymous compound statements
// (BEGIN NOT ATOMIC ... END, MariaDB 10.1.1 and later), one round trip each.
// go-sql-driver sends several statements in one query only with
// multiStatements=true in the DSN, and prepares, executes and closes every
// statement that has arguments; a compound statement is one query, and with
// the library's arguments written into it as literals it needs no prepare.
// A strict-mode job thus costs two round trips of its own (database/sql
// would take four: START TRANSACTION, fence, completion, COMMIT), and one
// when its COMMIT also begins the next run (runChain). Like the pgx
// pipeline, the transaction lives on a *sql.Conn, which the tasks' *gorm.DB
// uses as its connection pool. MySQL has no anonymous compound statements:
// there runs use database/sql transactions.

// mariaTxns holds run transactions on MariaDB in compound statements.
type mariaTxns struct {
	loc *time.Location // the driver's time zone (its DSN's loc)
}

// mariaBlocksFor returns the compound-statement run transactions for a
// MariaDB server reached through go-sql-driver via GORM's mysql dialector,
// whose DSN gives the time zone the driver writes times in. Where they do
// not apply it returns nil, with the reason when the server is a MariaDB
// that has them.
func mariaBlocksFor(db *gorm.DB, d *dialect, sqlDB *sql.DB) (*mariaTxns, string) {
	if d.kind != kindMySQL || !strings.Contains(strings.ToLower(d.version), "mariadb") {
		return nil, ""
	}
	if major, minor := parseVersion(d.version); major < 10 || major == 10 && minor < 2 {
		return nil, ""
	}
	if sqlDB == nil {
		return nil, "the connection pool is not a *sql.DB"
	}
	if _, ok := sqlDB.Driver().(*mysqldrv.MySQLDriver); !ok {
		return nil, fmt.Sprintf("the driver is %T, not go-sql-driver/mysql", sqlDB.Driver())
	}
	md, ok := db.Dialector.(*gormmysql.Dialector)
	if !ok || md.Config == nil || md.DSNConfig == nil {
		return nil, "the DSN's loc is unknown (GORM's mysql dialector was given no DSN)"
	}
	// The server (or a proxy in front of it, or sql_mode=ORACLE) may still
	// refuse the syntax: try it once.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var one int
	if err := sqlDB.QueryRowContext(ctx, "BEGIN NOT ATOMIC START TRANSACTION; SELECT 1; ROLLBACK; END").Scan(&one); err != nil || one != 1 {
		return nil, fmt.Sprintf("a trial compound statement failed: %v", err)
	}
	loc := md.DSNConfig.Loc
	if loc == nil {
		loc = time.UTC
	}
	return &mariaTxns{loc: loc}, ""
}

// mariaMaxInline bounds a statement with its arguments written in; a
// larger one (a long task result) runs with bound arguments instead. (A
// variable for tests.)
var mariaMaxInline = 1 << 20

var errNotInlinable = errors.New("async: argument cannot be written as an SQL literal")

// inline writes args into q's ? placeholders (the library's hot-path SQL has
// no ? in literals) as literals: integers in decimal, strings and bytes in
// hexadecimal (X'...', which needs no escaping under any sql_mode; strings
// with the _utf8mb4 introducer, so that they compare and convert as bound
// strings do), times in the driver's time zone at microsecond precision as
// the driver sends them, nil as NULL.
func (m *mariaTxns) inline(q string, args []any) (string, error) {
	parts := splitPlaceholders(q)
	if len(parts) != len(args)+1 {
		return "", fmt.Errorf("async: %d arguments for %d placeholders", len(args), len(parts)-1)
	}
	b := make([]byte, 0, len(q)+16*len(args))
	for i, a := range args {
		b = append(b, parts[i]...)
		var err error
		if b, err = m.appendLiteral(b, a); err != nil {
			return "", err
		}
		if len(b) > mariaMaxInline {
			return "", errNotInlinable
		}
	}
	return string(append(b, parts[len(args)]...)), nil
}

func (m *mariaTxns) appendLiteral(b []byte, a any) ([]byte, error) {
	if v, ok := a.(driver.Valuer); ok {
		var err error
		if a, err = v.Value(); err != nil {
			return nil, err
		}
	}
	switch v := a.(type) {
	case nil:
		return append(b, "NULL"...), nil
	case int:
		return strconv.AppendInt(b, int64(v), 10), nil
	case int32:
		return strconv.AppendInt(b, int64(v), 10), nil
	case int64:
		return strconv.AppendInt(b, v, 10), nil
	case uint32:
		return strconv.AppendUint(b, uint64(v), 10), nil
	case uint64:
		return strconv.AppendUint(b, v, 10), nil
	case bool:
		if v {
			return append(b, '1'), nil
		}
		return append(b, '0'), nil
	case string:
		// A character string, as a bound one is: compared under the
		// column's collation, converted to the column's character set.
		return appendHex(append(b, "_utf8mb4 "...), []byte(v)), nil
	case []byte:
		return appendHex(b, v), nil
	case time.Time:
		return append(append(append(b, '\''), v.In(m.loc).Format("2006-01-02 15:04:05.999999")...), '\''), nil
	case *time.Time:
		if v == nil {
			return append(b, "NULL"...), nil
		}
		return m.appendLiteral(b, *v)
	}
	return nil, fmt.Errorf("%w: %T", errNotInlinable, a)
}

func appendHex(b, v []byte) []byte {
	b = append(b, "X'"...)
	b = hex.AppendEncode(b, v)
	return append(b, '\'')
}

// splitPlaceholders splits q at its ? placeholders (cached: the hot-path
// texts are few).
func splitPlaceholders(q string) []string {
	if v, ok := splitCache.Load(q); ok {
		return v.([]string)
	}
	parts := strings.Split(q, "?")
	if len(q) < 4096 {
		splitCache.Store(q, parts)
	}
	return parts
}

var splitCache sync.Map

// begin takes a connection from sqlDB and starts a transaction on it with
// first (a SELECT or a write, or "") in one round trip; it returns the
// connection, holding the open transaction, and the rows first returned or
// affected.
func (m *mariaTxns) begin(ctx context.Context, sqlDB *sql.DB, first string, args []any) (*sql.Conn, int64, error) {
	conn, err := sqlDB.Conn(ctx)
	if err != nil {
		return nil, 0, err
	}
	var n int64
	read := strings.HasPrefix(first, "SELECT ")
	q, ierr := m.inline(first, args)
	switch {
	case first == "" || ierr != nil:
		_, err = conn.ExecContext(ctx, "START TRANSACTION")
		if err == nil && first != "" {
			n, err = runCounting(ctx, conn, read, first, args...)
		}
	default:
		n, err = runCounting(ctx, conn, read, "BEGIN NOT ATOMIC START TRANSACTION; "+q+"; END")
	}
	if err != nil {
		m.rollback(ctx, conn)
		return nil, 0, err
	}
	return conn, n, nil
}

// runCounting runs q on conn and counts the rows it returns if read, else
// the rows it affected (for a compound statement MariaDB reports the sum
// over the statements in it).
func runCounting(ctx context.Context, conn *sql.Conn, read bool, q string, args ...any) (int64, error) {
	if read {
		return countRows(conn.QueryContext(ctx, q, args...))
	}
	res, err := conn.ExecContext(ctx, q, args...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// commitMarks numbers the commits that begin the next run (commit), for
// telling whether such a commit took effect before an error.
var commitMarks atomic.Int64

// commit runs q (if not "") and COMMIT in one round trip, and with next
// (a write, if not "") also START TRANSACTION and next: the next run's
// start on the same connection. The errors are as for pgxTxns.commit; an error
// before the COMMIT took effect is reported as execErr.
//
// The statement returns no result set: next's count comes back in its OK
// packet, as the rows the whole statement affected (the sum: q, a run's
// completion of its fenced row, affects one), and after COMMIT it sets a
// session variable to a number of its own, which is read back only after an
// error, to tell an error before the commit from one after it. (Measured
// with a throwaway loop at c=4, six pairs alternated with the statement it
// replaced, whose fence was a locking read and which sent a SELECT 1 marker
// after COMMIT, two result sets: 4-22% more runs a second, 22-46 µs less
// client CPU per run; see README, Performance.)
func (m *mariaTxns) commit(ctx context.Context, conn *sql.Conn, q string, args []any, next string, nextArgs []any) (execErr, commitErr error, nextN int64, beginErr error) {
	nq := ""
	if next != "" {
		s, err := m.inline(next, nextArgs)
		if err == nil && strings.HasPrefix(next, "SELECT ") {
			err = errNotInlinable // a row to read: not in the OK packet
		}
		if err != nil {
			// Commit alone; the caller begins the next run afresh.
			execErr, commitErr, _, _ = m.commit(ctx, conn, q, args, "", nil)
			return execErr, commitErr, 0, err
		}
		nq = s
	}
	body, bodyRows := "", int64(0)
	if q != "" {
		s, err := m.inline(q, args)
		if err != nil {
			// Too long, or not writable as literals: bound arguments.
			if _, err := conn.ExecContext(ctx, q, args...); err != nil {
				return err, nil, 0, nil
			}
		} else {
			body, bodyRows = s+"; ", 1
		}
	}
	if next == "" {
		if body == "" {
			_, err := conn.ExecContext(ctx, "COMMIT")
			return nil, err, 0, nil
		}
		_, err := conn.ExecContext(ctx, "BEGIN NOT ATOMIC "+body+"COMMIT; END")
		return err, nil, 0, nil
	}
	mark := strconv.FormatInt(commitMarks.Add(1), 10)
	res, err := conn.ExecContext(ctx, "BEGIN NOT ATOMIC "+body+"COMMIT; SET @async_committed = "+mark+"; START TRANSACTION; "+nq+"; END")
	if err != nil {
		if m.committed(ctx, conn, mark) {
			return nil, nil, 0, err
		}
		return err, nil, 0, nil
	}
	total, err := res.RowsAffected()
	if err != nil {
		return nil, nil, 0, err
	}
	if nextN = total - bodyRows; nextN < 0 {
		return nil, nil, 0, fmt.Errorf("async: MariaDB counted %d rows for a commit and the next run's start", total)
	}
	return nil, nil, nextN, nil
}

// committed reports whether conn's session saw the commit numbered mark
// (commit): false also when it cannot tell.
func (m *mariaTxns) committed(ctx context.Context, conn *sql.Conn, mark string) bool {
	var got sql.NullString
	if err := conn.QueryRowContext(ctx, "SELECT @async_committed").Scan(&got); err != nil {
		return false
	}
	return got.Valid && got.String == mark
}

// rollback rolls back the transaction on conn and returns conn to the pool,
// or discards it if the rollback failed.
func (m *mariaTxns) rollback(ctx context.Context, conn *sql.Conn) {
	if _, err := conn.ExecContext(ctx, "ROLLBACK"); err != nil {
		_ = conn.Raw(func(any) error { return driver.ErrBadConn })
	}
	_ = conn.Close()
}

// runner runs hot-path statements in a run's transaction on conn, with
// their arguments written in (one round trip, no prepare), or bound where
// they cannot be.
func (m *mariaTxns) runner(conn *sql.Conn) sqlRunner { return mariaConn{m, conn} }

// mariaConn is mariaTxns.runner.
type mariaConn struct {
	m    *mariaTxns
	conn *sql.Conn
}

func (c mariaConn) ExecContext(ctx context.Context, q string, args ...any) (sql.Result, error) {
	if s, err := c.m.inline(q, args); err == nil {
		return c.conn.ExecContext(ctx, s)
	}
	return c.conn.ExecContext(ctx, q, args...)
}

func (c mariaConn) QueryContext(ctx context.Context, q string, args ...any) (*sql.Rows, error) {
	if s, err := c.m.inline(q, args); err == nil {
		return c.conn.QueryContext(ctx, s)
	}
	return c.conn.QueryContext(ctx, q, args...)
}

// countRows counts the rows of a query's first result set and closes it.
func countRows(rows *sql.Rows, err error) (int64, error) {
	if err != nil {
		return 0, err
	}
	defer rows.Close()
	var n int64
	for rows.Next() {
		n++
	}
	if err := rows.Err(); err != nil {
		return 0, err
	}
	return n, rows.Close()
}

// claimWalkBlocks is claimWalkTx on MariaDB, in compound statements on a
// connection of its own: the transaction's start (at READ COMMITTED, see
// claimTxOptions) travels with the first read, and its COMMIT with the
// UPDATE. Four round trips at most where database/sql takes seven.
func (p *Plugin) claimWalkBlocks(ctx context.Context, m *mariaTxns, f *claimFilter, now, lease time.Time) ([]*Job, error) {
	conn, err := p.sqlDB.Conn(ctx)
	if err != nil {
		return nil, err
	}
	const begin = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION"
	begun := false
	jobs, err := p.selectClaimable(func(q string, args ...any) (*sql.Rows, error) {
		s, err := m.inline(q, args)
		if err != nil { // too long to write in: statements of their own
			if !begun {
				begun = true
				for _, b := range strings.Split(begin, "; ") {
					if _, err := conn.ExecContext(ctx, b); err != nil {
						return nil, err
					}
				}
			}
			return conn.QueryContext(ctx, q, args...)
		}
		if !begun {
			begun = true
			s = "BEGIN NOT ATOMIC " + begin + "; " + s + "; END"
		}
		return conn.QueryContext(ctx, s)
	}, f, now)
	if err == nil && len(jobs) > 0 {
		claimReadHook()
		q, args := leaseSQL(jobs, f.owner, lease)
		var commitErr error
		if err, commitErr, _, _ = m.commit(ctx, conn, q, args, "", nil); err == nil {
			err = commitErr
		}
	} else if err == nil {
		_, err = conn.ExecContext(ctx, "COMMIT")
	}
	if err != nil {
		m.rollback(ctx, conn) // returns conn
		return nil, err
	}
	return jobs, conn.Close()
}
