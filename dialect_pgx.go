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

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

// Postgres through pgx: a run's BEGIN is pipelined with its first statement
// and its COMMIT with its last, so a strict-mode job costs two round trips
// of its own besides its task's (database/sql would take four: BEGIN, fence,
// completion, COMMIT). The transaction lives on a *sql.Conn, which the
// tasks' *gorm.DB uses as its connection pool.

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

// pipeBegin takes a connection from sqlDB and sends BEGIN and first (if
// any) in one round trip; it returns the connection, holding the open
// transaction, and the rows first affected.
func pipeBegin(ctx context.Context, sqlDB *sql.DB, first string, args []any) (*sql.Conn, int64, error) {
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
		if cerr := br.Close(); err == nil {
			err = cerr
		}
		if err != nil && pc.PgConn().TxStatus() != 'I' {
			if _, rerr := pc.Exec(ctx, "ROLLBACK"); rerr != nil {
				return fmt.Errorf("%w (%w)", err, driver.ErrBadConn)
			}
		}
		return err
	})
	if err != nil {
		_ = conn.Close()
		return nil, 0, err
	}
	return conn, n, nil
}

// pipeCommit sends q (if not "") and COMMIT in one round trip. On success
// the transaction has committed; on an error the caller rolls back.
func pipeCommit(ctx context.Context, conn *sql.Conn, q string, args []any) (n int64, execErr, commitErr error) {
	err := withPgx(conn, func(pc *pgx.Conn) error {
		b := &pgx.Batch{}
		if q != "" {
			b.Queue(rebind(q), args...)
		}
		b.Queue("COMMIT")
		br := pc.SendBatch(ctx, b)
		defer br.Close()
		if q != "" {
			tag, err := br.Exec()
			if err != nil {
				execErr = err
				return nil
			}
			n = tag.RowsAffected()
		}
		tag, err := br.Exec()
		switch {
		case err != nil:
			commitErr = err
		case tag.String() != "COMMIT":
			commitErr = errRolledBackAtCommit
		}
		if err := br.Close(); err != nil && execErr == nil && commitErr == nil {
			commitErr = err
		}
		return nil
	})
	if err != nil && execErr == nil && commitErr == nil {
		commitErr = err
	}
	return n, execErr, commitErr
}

// pipeRollback rolls back the transaction on conn and returns conn to the
// pool, or discards it if the rollback failed.
func pipeRollback(ctx context.Context, conn *sql.Conn) {
	_ = withPgx(conn, func(pc *pgx.Conn) error {
		if pc.PgConn().TxStatus() == 'I' {
			return nil
		}
		if _, err := pc.Exec(ctx, "ROLLBACK"); err != nil {
			return fmt.Errorf("async: rollback: %w (%w)", err, driver.ErrBadConn)
		}
		return nil
	})
	_ = conn.Close()
}
