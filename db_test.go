package async_test

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	mysqldrv "github.com/go-sql-driver/mysql"
	"github.com/libtnb/sqlite"
	"github.com/stretchr/testify/require"
	"gorm.io/driver/mysql"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gormasync/async"
)

// Test databases. SQLite always runs; Postgres and MySQL/MariaDB run when
// ASYNC_POSTGRES_DSN / ASYNC_MYSQL_DSN are set, and skip with a message
// otherwise, unless ASYNC_REQUIRE_DBS=1, when a missing DSN fails the test.
// Each test gets a database of its own, created here and dropped after.

type testDB struct {
	Kind  string // "sqlite", "postgres" or "mysql"
	DSN   string // DSN of this test's own database
	DB    *gorm.DB
	Clock *testClock
}

// testClock is db.NowFunc for tests: real time plus an offset tests can advance.
type testClock struct{ offset atomic.Int64 }

func (c *testClock) Now() time.Time          { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *testClock) Advance(d time.Duration) { c.offset.Add(int64(d)) }

var dbKinds = []string{"sqlite", "postgres", "mysql"}

// eachDB runs fn as a subtest on every database.
func eachDB(t *testing.T, fn func(t *testing.T, d *testDB)) {
	t.Helper()
	for _, kind := range dbKinds {
		t.Run(kind, func(t *testing.T) { fn(t, newTestDB(t, kind, nil)) })
	}
}

// eachServerDB runs fn as a subtest on Postgres and MySQL: for behaviour
// that needs runs to proceed side by side, which SQLite's one writer rules
// out (why says why, in the test's log).
func eachServerDB(t *testing.T, why string, fn func(t *testing.T, d *testDB)) {
	t.Helper()
	t.Logf("Postgres and MySQL only: %s", why)
	for _, kind := range dbKinds {
		if kind != "sqlite" {
			t.Run(kind, func(t *testing.T) { fn(t, newTestDB(t, kind, nil)) })
		}
	}
}

func testLogger() *slog.Logger {
	if os.Getenv("ASYNC_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// newTestDB creates a fresh database of the given kind with the plugin
// installed (plugin may be nil for the defaults).
func newTestDB(t testing.TB, kind string, plugin *async.Plugin) *testDB {
	t.Helper()
	return newTestDBWith(t, kind, nil, plugin)
}

// newTestDBWith is newTestDB with the gorm.Config shaped by shape.
func newTestDBWith(t testing.TB, kind string, shape func(*gorm.Config), plugin *async.Plugin) *testDB {
	t.Helper()
	dsn := createDatabase(t, kind)
	d := &testDB{Kind: kind, DSN: dsn, Clock: &testClock{}}
	d.DB = openDBWith(t, kind, dsn, d.Clock, shape)
	if plugin == nil {
		plugin = &async.Plugin{}
	}
	if plugin.Logger == nil {
		plugin.Logger = testLogger()
	}
	require.NoError(t, d.DB.Use(plugin))
	return d
}

func openDB(t testing.TB, kind, dsn string, clock *testClock) *gorm.DB {
	t.Helper()
	return openDBWith(t, kind, dsn, clock, nil)
}

// openDBWith is openDB with the gorm.Config shaped by shape, if not nil.
func openDBWith(t testing.TB, kind, dsn string, clock *testClock, shape func(*gorm.Config)) *gorm.DB {
	t.Helper()
	cfg := &gorm.Config{Logger: logger.Default.LogMode(logger.Silent)}
	if clock != nil {
		cfg.NowFunc = clock.Now
	}
	if shape != nil {
		shape(cfg)
	}
	var dial gorm.Dialector
	switch kind {
	case "sqlite":
		dial = sqlite.Open(dsn)
	case "postgres":
		dial = postgres.Open(dsn)
	case "mysql":
		dial = mysql.Open(dsn)
	}
	db, err := gorm.Open(dial, cfg)
	require.NoError(t, err)
	sqlDB, err := db.DB()
	require.NoError(t, err)
	sqlDB.SetMaxOpenConns(20)
	t.Cleanup(func() { _ = sqlDB.Close() })
	return db
}

func envDSN(t testing.TB, kind string) string {
	t.Helper()
	env := map[string]string{"postgres": "ASYNC_POSTGRES_DSN", "mysql": "ASYNC_MYSQL_DSN"}[kind]
	dsn := os.Getenv(env)
	if dsn == "" {
		if os.Getenv("ASYNC_REQUIRE_DBS") == "1" {
			t.Fatalf("%s is not set and ASYNC_REQUIRE_DBS=1", env)
		}
		t.Skipf("%s tests skipped: set %s to run them", kind, env)
	}
	return dsn
}

func randomName() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "async_test_" + hex.EncodeToString(b[:])
}

// createDatabase makes an empty database and returns its DSN.
func createDatabase(t testing.TB, kind string) string {
	t.Helper()
	if kind == "sqlite" {
		return sqliteDSN(filepath.Join(t.TempDir(), "test.db"))
	}
	base := envDSN(t, kind)
	name := randomName()
	admin := openDB(t, kind, base, nil)
	switch kind {
	case "postgres":
		require.NoError(t, admin.Exec("CREATE DATABASE "+name).Error)
		t.Cleanup(func() { admin.Exec("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)") })
		return postgresDSNWithDB(t, base, name)
	case "mysql":
		require.NoError(t, admin.Exec("CREATE DATABASE "+name).Error)
		t.Cleanup(func() { admin.Exec("DROP DATABASE IF EXISTS " + name) })
		cfg, err := mysqldrv.ParseDSN(base)
		require.NoError(t, err)
		cfg.DBName = name
		cfg.ParseTime = true
		cfg.Loc = time.UTC
		return cfg.FormatDSN()
	}
	t.Fatalf("unknown database kind %q", kind)
	return ""
}

func sqliteDSN(path string) string {
	return path + "?_pragma=busy_timeout(20000)&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)"
}

func postgresDSNWithDB(t testing.TB, base, name string) string {
	if strings.HasPrefix(base, "postgres://") || strings.HasPrefix(base, "postgresql://") {
		u, err := url.Parse(base)
		require.NoError(t, err)
		u.Path = "/" + name
		return u.String()
	}
	return fmt.Sprintf("%s dbname=%s", base, name)
}

// count runs SELECT COUNT(*) with a WHERE clause on a table.
func count(t testing.TB, db *gorm.DB, table, where string, args ...any) int64 {
	t.Helper()
	var n int64
	q := db.Table(table)
	if where != "" {
		q = q.Where(where, args...)
	}
	require.NoError(t, q.Count(&n).Error)
	return n
}
