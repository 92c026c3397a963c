package async

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

// Postgres through pgx: a run's BEGIN is pipelined with its first statement
// and its COMMIT with its last, so a strict-mode job costs two round trips
// of its own besides its task's (database/sql would take four: BEGIN, fence,
// completion, COMMIT), and one when its COMMIT also begins the next run
// (commit with next). The transaction lives on a *sql.Conn, which the tasks'
// *gorm.DB uses as its connection pool.

// pgxTxns holds run transactions on Postgres in pgx pipelines (connTxns).
type pgxTxns struct{}

// runner is nil: GORM runs hot-path statements in a run's transaction
// (pgx prepares and caches them itself).
func (pgxTxns) runner(*sql.Conn) sqlRunner { return nil }

// usesPgx reports whether sqlDB's connections are pgx connections.
func usesPgx(sqlDB *sql.DB) bool {
	if sqlDB == nil {
		return false
	}
	_, ok := sqlDB.Driver().(*stdlib.Driver)
	return ok
}

// errRolledBackAtCommit is returned when COMMIT found the transaction
// aborted (the server answers such a COMMIT with ROLLBACK).
var errRolledBackAtCommit = errors.New("async: the transaction was aborted; COMMIT rolled it back")

// rebind turns ? placeholders into $1, $2, ... (the library's hot-path SQL
// has no ? in literals).
func rebind(q string) string {
	if v, ok := rebound.Load(q); ok {
		return v.(string)
	}
	var b strings.Builder
	n := 0
	for _, r := range q {
		if r == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(r)
	}
	s := b.String()
	rebound.Store(q, s)
	return s
}

var rebound sync.Map

// withPgx runs f on the pgx connection under conn. An error that leaves the
// connection in a transaction or broken discards it instead of returning it
// to the pool.
func withPgx(conn *sql.Conn, f func(pc *pgx.Conn) error) error {
	return conn.Raw(func(dc any) error {
		sc, ok := dc.(*stdlib.Conn)
		if !ok {
			return fmt.Errorf("async: postgres driver connection is %T, not pgx", dc)
		}
		return f(sc.Conn())
	})
}

// begin takes a connection from sqlDB and sends BEGIN and first (if any)
// in one round trip; it returns the connection, holding the open
// transaction, and the rows first affected.
func (pgxTxns) begin(ctx context.Context, sqlDB *sql.DB, first string, args []any) (*sql.Conn, int64, error) {
	conn, err := sqlDB.Conn(ctx)
	if err != nil {
		return nil, 0, err
	}
	var n int64
	err = withPgx(conn, func(pc *pgx.Conn) error {
		b := &pgx.Batch{}
		b.Queue("BEGIN")
		if first != "" {
			b.Queue(rebind(first), args...)
		}
		br := pc.SendBatch(ctx, b)
		_, err := br.Exec()
		if err == nil && first != "" {
			tag, e := br.Exec()
			n, err = tag.RowsAffected(), e
		}
		return endBatch(ctx, pc, br, err)
	})
	if err != nil {
		_ = conn.Close()
		return nil, 0, err
	}
	return conn, n, nil
}

// commit sends q (if not "") and COMMIT in one round trip, and with next
// (if not "") also BEGIN and next: the next run's start on the same
// connection. On success the transaction has committed. execErr is q's
// error and commitErr COMMIT's (the server then skips the rest; the caller
// rolls back what is open: after a COMMIT that answered ROLLBACK, BEGIN and
// next ran). beginErr is the failure of BEGIN or next, after which the
// caller rolls back; nextN is the rows next affected.
func (pgxTxns) commit(ctx context.Context, conn *sql.Conn, q string, args []any, next string, nextArgs []any) (execErr, commitErr error, nextN int64, beginErr error) {
	err := withPgx(conn, func(pc *pgx.Conn) error {
		b := &pgx.Batch{}
		if q != "" {
			b.Queue(rebind(q), args...)
		}
		b.Queue("COMMIT")
		if next != "" {
			b.Queue("BEGIN")
			b.Queue(rebind(next), nextArgs...)
		}
		br := pc.SendBatch(ctx, b)
		defer br.Close()
		if q != "" {
			if _, err := br.Exec(); err != nil {
				execErr = err
				return nil
			}
		}
		tag, err := br.Exec()
		switch {
		case err != nil:
			commitErr = err
			return nil
		case tag.String() != "COMMIT":
			commitErr = errRolledBackAtCommit
			return nil
		}
		if next != "" {
			if _, err := br.Exec(); err != nil {
				beginErr = err
				return nil
			}
			tag, err := br.Exec()
			if err != nil {
				beginErr = err
				return nil
			}
			nextN = tag.RowsAffected()
		}
		if err := br.Close(); err != nil {
			if next != "" {
				beginErr = err
			} else {
				commitErr = err
			}
		}
		return nil
	})
	if err != nil && execErr == nil && commitErr == nil {
		commitErr = err
	}
	return execErr, commitErr, nextN, beginErr
}

// rollback rolls back the transaction on conn and returns conn to the
// pool, or discards it if the rollback failed.
func (pgxTxns) rollback(ctx context.Context, conn *sql.Conn) {
	_ = withPgx(conn, func(pc *pgx.Conn) error { return rollbackOrDiscard(ctx, pc, nil) })
	_ = conn.Close()
}

// endBatch closes br and, when the batch failed (err, or an error Close
// reports), rolls back the transaction it left open (rollbackOrDiscard).
func endBatch(ctx context.Context, pc *pgx.Conn, br pgx.BatchResults, err error) error {
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		return nil
	}
	return rollbackOrDiscard(ctx, pc, err)
}

// rollbackOrDiscard rolls back a transaction left open on pc, and returns
// cause. If the rollback fails, the error also wraps driver.ErrBadConn, so
// that database/sql discards the connection instead of pooling it.
func rollbackOrDiscard(ctx context.Context, pc *pgx.Conn, cause error) error {
	if pc.PgConn().TxStatus() == 'I' {
		return cause
	}
	if _, err := pc.Exec(ctx, "ROLLBACK"); err != nil {
		if cause == nil {
			cause = fmt.Errorf("async: rollback: %w", err)
		}
		return fmt.Errorf("%w (%w)", cause, driver.ErrBadConn)
	}
	return cause
}

// pipeClaim runs a claim (an UPDATE ... RETURNING jobColumnList with ?
// placeholders) in its own transaction in one round trip, with two settings
// for that transaction only: its commit does not wait for the WAL flush
// (see dialect.lazyCommitFrom), and the statement runs on a generic plan,
// without JIT. The claim's statement walks priorities in a recursive CTE:
// planning it for its parameters (Postgres's default for a prepared
// statement whose generic plan looks dearer) cost several times its
// execution; and the generic plan's cost estimate (its LIMITs unknown) is
// above jit_above_cost, so JIT would compile it on every call (0.4 s).
func pipeClaim(ctx context.Context, sqlDB *sql.DB, q string, args []any) ([]*Job, error) {
	conn, err := sqlDB.Conn(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	var jobs []*Job
	err = withPgx(conn, func(pc *pgx.Conn) error {
		b := &pgx.Batch{}
		b.Queue("BEGIN")
		b.Queue("SET LOCAL synchronous_commit = off")
		b.Queue("SET LOCAL plan_cache_mode = force_generic_plan")
		b.Queue("SET LOCAL jit = off")
		b.Queue(rebind(q), args...)
		b.Queue("COMMIT")
		br := pc.SendBatch(ctx, b)
		err := func() error {
			for i := 0; i < 4; i++ {
				if _, err := br.Exec(); err != nil {
					return err
				}
			}
			rows, err := br.Query()
			if err != nil {
				return err
			}
			for rows.Next() {
				j, err := scanJob(rows)
				if err != nil {
					rows.Close()
					return err
				}
				jobs = append(jobs, j)
			}
			rows.Close()
			if err := rows.Err(); err != nil {
				return err
			}
			tag, err := br.Exec()
			if err == nil && tag.String() != "COMMIT" {
				err = errRolledBackAtCommit
			}
			return err
		}()
		return endBatch(ctx, pc, br, err)
	})
	if err != nil {
		return nil, err
	}
	return jobs, nil
}

// pgArray is a slice bound as one array parameter: GORM spreads a plain
// slice into a list of parameters, but leaves a driver.Valuer whole, and
// pgx encodes the slice it returns as an array.
type pgArray[T any] []T

// Value returns the slice itself, for pgx.
func (a pgArray[T]) Value() (driver.Value, error) { return []T(a), nil }

// completeAllArraysSQL is completeAllSQL through pgx.
func completeAllArraysSQL(jobs []*Job, starts []time.Time, results []string, done time.Time) (string, []any) {
	const q = "UPDATE " + jobTable + " AS j SET executed = ?, locked_by = '', locked_until = NULL, started = v.started, result = v.result" +
		" FROM unnest(CAST(? AS BIGINT[]), CAST(? AS BIGINT[]), CAST(? AS TIMESTAMPTZ[]), CAST(? AS TEXT[])) AS v (id, attempts, started, result)" +
		" WHERE j.id = v.id AND j.attempts = v.attempts AND j.locked_by = ? AND " + stillPending // v has no such columns
	ids := make(pgArray[int64], len(jobs))
	attempts := make(pgArray[int64], len(jobs))
	for i, j := range jobs {
		ids[i], attempts[i] = j.ID, int64(j.Attempts)
	}
	return q, []any{done, ids, attempts, pgArray[time.Time](starts), pgArray[string](results), jobs[0].LockedBy}
}
