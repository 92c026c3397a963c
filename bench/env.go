package main

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	mysqldrv "github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib" // also registers the "pgx" database/sql driver
	"github.com/libtnb/sqlite"
	"gorm.io/driver/mysql"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gormasync/async"
)

// env is one database under test: a scratch database (or SQLite file) that
// each case empties before it starts.
type env struct {
	kind    string // "sqlite", "postgres" or "mysql"
	dsn     string // DSN of the scratch database, for GORM and database/sql alike
	driver  string // database/sql driver name for raw loops
	admin   *sql.DB
	drop    func() error // drops the scratch database
	dir     string       // SQLite: the directory of the database file
	version string
	trace   *sqlTrace // Postgres with -sqltrace: traces the GORM pools
	// afterMigrate are -after-migrate's what-if statements.
	afterMigrate []string
}

// benchTables are dropped by reset: the library's and the bench's own.
var benchTables = []string{"async_job", "async_error", "async_group", "async_lock", "bench_effect", "bench_raw", "bench_counter"}

func openEnv(ctx context.Context, cfg *config, kind string) (*env, error) {
	e := &env{kind: kind}
	var err error
	switch kind {
	case "sqlite":
		e.driver = "sqlite"
		if e.dir, err = os.MkdirTemp("", "async-bench-"); err != nil {
			return nil, err
		}
		e.dsn = sqliteDSN(filepath.Join(e.dir, "bench.db"))
		e.drop = func() error { return os.RemoveAll(e.dir) }
	case "postgres":
		e.driver = "pgx"
		if e.dsn, e.drop, err = createScratch(ctx, "pgx", cfg.pgDSN, cfg.scratch, pgWithDB); err != nil {
			return nil, err
		}
	case "mysql":
		e.driver = "mysql"
		if e.dsn, e.drop, err = createScratch(ctx, "mysql", cfg.myDSN, cfg.scratch, mysqlWithDB); err != nil {
			return nil, err
		}
	}
	e.afterMigrate = cfg.afterMigrate
	if cfg.sqlTrace && kind == "postgres" {
		e.trace = newSQLTrace()
	}
	if e.admin, err = e.openRaw(4); err != nil {
		_ = e.drop()
		return nil, err
	}
	q := map[string]string{"sqlite": "SELECT sqlite_version()", "postgres": "SHOW server_version", "mysql": "SELECT VERSION()"}[kind]
	if err := e.admin.QueryRowContext(ctx, q).Scan(&e.version); err != nil {
		e.close(false)
		return nil, fmt.Errorf("%s: %w", kind, err)
	}
	return e, nil
}

// close closes the admin pool and drops the scratch database unless keep.
func (e *env) close(keep bool) {
	_ = e.admin.Close()
	if !keep || e.kind == "sqlite" {
		if err := e.drop(); err != nil {
			progress("%s: dropping scratch database: %v", e.kind, err)
		}
	}
}

func sqliteDSN(path string) string {
	return path + "?_pragma=busy_timeout(20000)&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)"
}

func pgWithDB(base, name string) (string, error) {
	if strings.HasPrefix(base, "postgres://") || strings.HasPrefix(base, "postgresql://") {
		u, err := url.Parse(base)
		if err != nil {
			return "", err
		}
		u.Path = "/" + name
		return u.String(), nil
	}
	return base + " dbname=" + name, nil
}

func mysqlWithDB(base, name string) (string, error) {
	c, err := mysqldrv.ParseDSN(base)
	if err != nil {
		return "", err
	}
	c.DBName, c.ParseTime, c.Loc = name, true, time.UTC
	return c.FormatDSN(), nil
}

// createScratch (re)creates the scratch database on the server of base.
func createScratch(ctx context.Context, driver, base, name string, withDB func(string, string) (string, error)) (string, func() error, error) {
	srv, err := sql.Open(driver, base)
	if err != nil {
		return "", nil, err
	}
	dropSQL := "DROP DATABASE IF EXISTS " + name
	if driver == "pgx" {
		dropSQL += " WITH (FORCE)"
	}
	drop := func() error {
		defer srv.Close()
		_, err := srv.ExecContext(context.Background(), dropSQL)
		return err
	}
	if _, err := srv.ExecContext(ctx, dropSQL); err != nil {
		srv.Close()
		return "", nil, fmt.Errorf("%s: %w", driver, err)
	}
	if _, err := srv.ExecContext(ctx, "CREATE DATABASE "+name); err != nil {
		srv.Close()
		return "", nil, fmt.Errorf("%s: %w", driver, err)
	}
	dsn, err := withDB(base, name)
	if err != nil {
		_ = drop()
		return "", nil, err
	}
	return dsn, drop, nil
}

// reset drops every table a case may have left.
func (e *env) reset(ctx context.Context) error {
	var stmts []string
	switch e.kind {
	case "postgres":
		stmts = []string{"DROP TABLE IF EXISTS " + strings.Join(benchTables, ", ") + " CASCADE"}
	case "mysql":
		stmts = []string{"DROP TABLE IF EXISTS " + strings.Join(benchTables, ", ")}
	case "sqlite":
		for _, t := range benchTables {
			stmts = append(stmts, "DROP TABLE IF EXISTS "+t)
		}
		stmts = append(stmts, "VACUUM")
	}
	for _, s := range stmts {
		if _, err := e.admin.ExecContext(ctx, s); err != nil {
			return fmt.Errorf("%s: reset: %w", e.kind, err)
		}
	}
	return nil
}

// openRaw opens a database/sql pool on the scratch database.
func (e *env) openRaw(maxConns int) (*sql.DB, error) {
	db, err := sql.Open(e.driver, e.dsn)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(maxConns)
	db.SetMaxIdleConns(maxConns)
	return db, nil
}

// openGorm opens GORM on the scratch database with plugin installed (which
// migrates the tables unless plugin.SkipMigration). close closes the pool.
func (e *env) openGorm(maxConns int, plugin *async.Plugin) (db *gorm.DB, closeFn func(), err error) {
	var dial gorm.Dialector
	switch e.kind {
	case "sqlite":
		dial = sqlite.Open(e.dsn)
	case "postgres":
		dial = postgres.Open(e.dsn)
		if e.trace != nil {
			cc, err := pgx.ParseConfig(e.dsn)
			if err != nil {
				return nil, nil, err
			}
			cc.Tracer = e.trace
			dial = postgres.New(postgres.Config{Conn: stdlib.OpenDB(*cc)})
		}
	case "mysql":
		dial = mysql.Open(e.dsn)
	}
	db, err = gorm.Open(dial, &gorm.Config{Logger: logger.Default.LogMode(logger.Silent)})
	if err != nil {
		return nil, nil, fmt.Errorf("%s: open: %w", e.kind, err)
	}
	sqlDB, err := db.DB()
	if err != nil {
		return nil, nil, err
	}
	sqlDB.SetMaxOpenConns(maxConns)
	sqlDB.SetMaxIdleConns(maxConns)
	closeFn = func() { _ = sqlDB.Close() }
	if plugin.Logger == nil {
		plugin.Logger = libLogger()
	}
	if err := db.Use(plugin); err != nil {
		closeFn()
		return nil, nil, fmt.Errorf("%s: installing the plugin: %w", e.kind, err)
	}
	if !plugin.SkipMigration {
		for _, s := range e.afterMigrate {
			if err := db.Exec(s).Error; err != nil {
				closeFn()
				return nil, nil, fmt.Errorf("%s: -after-migrate %q: %w", e.kind, s, err)
			}
		}
	}
	return db, closeFn, nil
}

// libLogger shows the library's warnings and errors (a failing claim, a
// lost listener) on stderr, where they explain a bad number.
func libLogger() *slog.Logger {
	if os.Getenv("BENCH_QUIET_LIB") != "" {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// analyze refreshes planner statistics, as autovacuum or InnoDB's automatic
// statistics would have on a table that grew this large in production. On
// Postgres it also vacuums the table, as autovacuum would after a bulk load,
// and checkpoints, so that neither starts during the measurement that
// follows (each job's commit there waits on a WAL flush, which a checkpoint
// writing the loaded pages out slows). The claim-cost rows still swing with
// the disk's flush latency: in one evening's runs, 0.84x to 2.11x.
func (e *env) analyze(ctx context.Context) error {
	var qs []string
	switch e.kind {
	case "postgres":
		qs = []string{"VACUUM (ANALYZE) async_job", "CHECKPOINT"}
	case "mysql":
		qs = []string{"ANALYZE TABLE async_job"}
	default:
		return nil // SQLite apps rarely run ANALYZE; measure what they get
	}
	for _, q := range qs {
		rows, err := e.admin.QueryContext(ctx, q)
		if err != nil {
			return err
		}
		if err := rows.Close(); err != nil {
			return err
		}
	}
	return nil
}

// createEffectTable makes the table the one-insert task writes to.
func (e *env) createEffectTable(ctx context.Context) error {
	ddl := map[string]string{
		"postgres": "CREATE TABLE bench_effect (id BIGSERIAL PRIMARY KEY, n BIGINT NOT NULL)",
		"mysql":    "CREATE TABLE bench_effect (id BIGINT AUTO_INCREMENT PRIMARY KEY, n BIGINT NOT NULL)",
		"sqlite":   "CREATE TABLE bench_effect (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER NOT NULL)",
	}[e.kind]
	_, err := e.admin.ExecContext(ctx, ddl)
	return err
}

// pgConnArgs turns a Postgres DSN into pgbench's connection options and environment.
func pgConnArgs(dsn string) ([]string, []string, error) {
	c, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, nil, err
	}
	args := []string{"-h", c.Host, "-p", fmt.Sprint(c.Port), "-U", c.User}
	env := os.Environ()
	if c.Password != "" {
		env = append(env, "PGPASSWORD="+c.Password)
	}
	return append(args, c.Database), env, nil
}
