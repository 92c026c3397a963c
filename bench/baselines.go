package main

import (
	"context"
	"database/sql"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Baselines, measured in the same run as the figures compared with them:
// pgbench -N on Postgres, and raw database/sql loops (no GORM, no library)
// doing what the library's statements do.

var tpsRE = regexp.MustCompile(`tps = ([0-9.]+) \(without initial connection time\)`)

// pgbenchInit creates pgbench's tables (scale 1) in the scratch database.
func pgbenchInit(ctx context.Context, e *env) error {
	conn, environ, err := pgConnArgs(e.dsn)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "pgbench", append([]string{"-i", "-s", "1", "-q"}, conn...)...)
	cmd.Env = environ
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pgbench -i: %w: %s", err, out)
	}
	return nil
}

// pgbenchTPS runs pgbench -N (simple update, no branch/teller updates) with
// c clients and c threads for d (whole seconds, at least 1).
func pgbenchTPS(ctx context.Context, e *env, clients int, d time.Duration) (float64, error) {
	conn, environ, err := pgConnArgs(e.dsn)
	if err != nil {
		return 0, err
	}
	secs := max(1, int(d.Round(time.Second)/time.Second))
	args := append([]string{"-N", "-T", strconv.Itoa(secs), "-c", strconv.Itoa(clients), "-j", strconv.Itoa(clients)}, conn...)
	cmd := exec.CommandContext(ctx, "pgbench", args...)
	cmd.Env = environ
	out, err := cmd.CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("pgbench: %w: %s", err, out)
	}
	m := tpsRE.FindSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("pgbench: no tps in output: %s", out)
	}
	return strconv.ParseFloat(string(m[1]), 64)
}

// createRawTable makes bench_raw, a copy of async_job (columns, defaults,
// indexes; not the NOTIFY trigger), for the raw insert loops.
func (e *env) createRawTable(ctx context.Context) error {
	switch e.kind {
	case "postgres":
		_, err := e.admin.ExecContext(ctx, "CREATE TABLE bench_raw (LIKE async_job INCLUDING ALL)")
		return err
	case "mysql":
		_, err := e.admin.ExecContext(ctx, "CREATE TABLE bench_raw LIKE async_job")
		return err
	}
	rows, err := e.admin.QueryContext(ctx, "SELECT sql FROM sqlite_master WHERE tbl_name = 'async_job' AND sql IS NOT NULL ORDER BY type DESC")
	if err != nil {
		return err
	}
	var ddl []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			rows.Close()
			return err
		}
		ddl = append(ddl, strings.ReplaceAll(s, "async_job", "bench_raw"))
	}
	if err := rows.Close(); err != nil {
		return err
	}
	for _, s := range ddl { // the table first ("table" sorts after "index", hence DESC)
		if _, err := e.admin.ExecContext(ctx, s); err != nil {
			return err
		}
	}
	return nil
}

// rawNotifyTrigger puts the library's NOTIFY trigger on bench_raw, or takes it off.
func (e *env) rawNotifyTrigger(ctx context.Context, on bool) error {
	q := "DROP TRIGGER IF EXISTS bench_raw_notify ON bench_raw"
	if on {
		q = "CREATE TRIGGER bench_raw_notify AFTER INSERT ON bench_raw FOR EACH STATEMENT EXECUTE FUNCTION async_job_notify()"
	}
	_, err := e.admin.ExecContext(ctx, q)
	return err
}

// rawJobColumns are the columns GORM's Create of a Job writes.
const rawJobColumns = "name, queue, args, kwargs, meta, result, priority, identity, added, scheduled, started, executed, cancelled, failed, attempts, max_attempts, locked_until, locked_by, group_id"

const rawJobColumnCount = 19

// rawInsertSQL is an INSERT of n job rows into bench_raw with placeholders.
func (e *env) rawInsertSQL(n int) string {
	var b strings.Builder
	b.WriteString("INSERT INTO bench_raw (" + rawJobColumns + ") VALUES ")
	k := 0
	for i := 0; i < n; i++ {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('(')
		for j := 0; j < rawJobColumnCount; j++ {
			if j > 0 {
				b.WriteByte(',')
			}
			k++
			if e.kind == "postgres" {
				fmt.Fprintf(&b, "$%d", k)
			} else {
				b.WriteByte('?')
			}
		}
		b.WriteByte(')')
	}
	if e.kind == "postgres" {
		b.WriteString(" RETURNING id")
	}
	return b.String()
}

// rawJobArgs appends the values of one no-op job row.
func rawJobArgs(args []any, ident string) []any {
	return append(args, taskNoop, "default", "[]", "{}", "{}", "", 5, ident, time.Now().UTC(),
		nil, nil, nil, nil, nil, 0, 25, nil, "", nil)
}

// rawRowsPerStmt is how many job rows one raw INSERT carries: all of them,
// except on SQLite, whose pure-Go driver binds parameters in quadratic time
// (a 1000-row statement, 19000 parameters, takes hundreds of milliseconds
// to bind), so there the rows go in statements of at most 999 parameters,
// as the library's ScheduleMany does.
func (e *env) rawRowsPerStmt(batch int) int {
	if e.kind == "sqlite" {
		return min(batch, 999/rawJobColumnCount)
	}
	return batch
}

// rawInsert inserts n rows with statements of stmtRows rows (stmt) in one
// transaction, reading back the ids as GORM does (RETURNING on Postgres,
// LastInsertId elsewhere).
func (e *env) rawInsert(ctx context.Context, db *sql.DB, stmt, tail string, stmtRows, n int) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck // after Commit it is a no-op
	ident := textIdentity(taskNoop, nil)
	for done := 0; done < n; done += stmtRows {
		k, q := stmtRows, stmt
		if n-done < stmtRows {
			k, q = n-done, tail
		}
		args := make([]any, 0, k*rawJobColumnCount)
		for i := 0; i < k; i++ {
			args = rawJobArgs(args, ident)
		}
		if err := e.rawInsertStmt(ctx, tx, q, args); err != nil {
			return err
		}
	}
	return tx.Commit()
}

func (e *env) rawInsertStmt(ctx context.Context, tx *sql.Tx, stmt string, args []any) error {
	if e.kind == "postgres" {
		rows, err := tx.QueryContext(ctx, stmt, args...)
		if err != nil {
			return err
		}
		for rows.Next() {
			var id int64
			if err := rows.Scan(&id); err != nil {
				rows.Close()
				return err
			}
		}
		if err := rows.Close(); err != nil {
			return err
		}
	} else {
		res, err := tx.ExecContext(ctx, stmt, args...)
		if err != nil {
			return err
		}
		if _, err := res.LastInsertId(); err != nil {
			return err
		}
	}
	return nil
}

// rawInsertRate measures raw inserts of batch rows per transaction, conc
// loops, for d: jobs per second.
func rawInsertRate(ctx context.Context, e *env, conc, batch int, d time.Duration) (float64, string, error) {
	db, err := e.openRaw(conc)
	if err != nil {
		return 0, "", err
	}
	defer db.Close()
	rows := e.rawRowsPerStmt(batch)
	stmt, tail := e.rawInsertSQL(rows), e.rawInsertSQL(max(batch%rows, 1))
	return loopCPU(ctx, conc, d, func(ctx context.Context, _ int) (int, error) {
		return batch, e.rawInsert(ctx, db, stmt, tail, rows, batch)
	})
}

// rawUpdateRate measures conc loops of BEGIN; UPDATE one row (each loop its
// own row); COMMIT, for d: transactions per second.
func rawUpdateRate(ctx context.Context, e *env, conc int, d time.Duration) (float64, error) {
	if _, err := e.admin.ExecContext(ctx, "DROP TABLE IF EXISTS bench_counter"); err != nil {
		return 0, err
	}
	if _, err := e.admin.ExecContext(ctx, "CREATE TABLE bench_counter (id INTEGER PRIMARY KEY, n BIGINT NOT NULL)"); err != nil {
		return 0, err
	}
	for i := 0; i < conc; i++ {
		if _, err := e.admin.ExecContext(ctx, fmt.Sprintf("INSERT INTO bench_counter (id, n) VALUES (%d, 0)", i)); err != nil {
			return 0, err
		}
	}
	db, err := e.openRaw(conc)
	if err != nil {
		return 0, err
	}
	defer db.Close()
	upd := "UPDATE bench_counter SET n = n + 1 WHERE id = ?"
	if e.kind == "postgres" {
		upd = "UPDATE bench_counter SET n = n + 1 WHERE id = $1"
	}
	return loop(ctx, conc, d, func(ctx context.Context, g int) (int, error) {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return 0, err
		}
		if _, err := tx.ExecContext(ctx, upd, g); err != nil {
			_ = tx.Rollback()
			return 0, err
		}
		return 1, tx.Commit()
	})
}
