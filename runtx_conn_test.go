package async_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"
	_ "time/tzdata" // the time zone test's Asia/Tokyo

	mysqldrv "github.com/go-sql-driver/mysql"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/driver/mysql"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gormasync/async"
)

// On Postgres (pgx) and MariaDB a run's transaction is held on a connection
// by the library, its BEGIN and COMMIT sent with the run's first and last
// statements, and on MariaDB the library's arguments are written into those
// statements as literals. These tests pin what that must not change.

func echoResult(ctx context.Context, tx *gorm.DB, s string) (string, error) { return s, nil }

func init() { async.MustRegister(echoResult) }

// trickyText has what a literal could get wrong: quotes, backslashes, a
// question mark (a placeholder to a naive rewrite), non-ASCII text and
// control characters.
const trickyText = "it's a \\'quoted\\' \"test\" -- ? ünïcödé 😀 \t\n\x01 end"

// A task's result is stored exactly, whether the completion carries it as a
// literal or (past the size limit for literals) as a bound argument, run by
// FlushQueue or by a worker (whose commits also begin the next run).
func TestRunResultStoredExactly(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		long := strings.Repeat(trickyText, 200)
		for _, limit := range []int{0, 16} {
			for _, byWorker := range []bool{false, true} {
				restore := async.SetInlineLimit(limit) // 0: the default
				want := map[int64]string{}
				for i := range 6 {
					text := []string{trickyText, long}[i%2]
					job, err := async.Schedule(d.DB, echoResult, async.Args(text))
					require.NoError(t, err)
					want[job.ID] = text
				}
				if byWorker {
					stop := startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, PollInterval: 20 * time.Millisecond})
					for id := range want {
						waitJob(t, d.DB, id, time.Minute, "the job", executed)
					}
					stop()
				} else {
					n, err := async.FlushQueue(d.DB, async.FlushOptions{})
					require.NoError(t, err)
					require.Equal(t, len(want), n)
				}
				restore()
				for id, text := range want {
					got := getJob(t, d.DB, id)
					require.NotNil(t, got.Executed, "job %d ran", id)
					assert.Equal(t, 1, got.Attempts, "job %d ran once", id)
					w, _ := json.Marshal(text)
					assert.Equal(t, string(w), got.Result, "limit %d, worker %v", limit, byWorker)
				}
			}
		}
	})
}

// Times a run writes are stored in the driver's time zone, as bound
// arguments would be: read back through the same DSN, they are the instants
// the run recorded.
func TestRunTimesFollowTheDriversTimeZone(t *testing.T) {
	base := newTestDB(t, "mysql", nil)
	cfg, err := mysqldrv.ParseDSN(base.DSN)
	require.NoError(t, err)
	cfg.Loc, err = time.LoadLocation("Asia/Tokyo")
	require.NoError(t, err)
	db := openDB(t, "mysql", cfg.FormatDSN(), nil)
	require.NoError(t, db.Use(&async.Plugin{Logger: testLogger()}))
	migrateApp(t, &testDB{Kind: "mysql", DB: db})

	before := time.Now().Add(-time.Second)
	job, err := async.Schedule(db, echoResult, async.Args("tz"))
	require.NoError(t, err)
	n, err := async.FlushQueue(db, async.FlushOptions{})
	require.NoError(t, err)
	require.Equal(t, 1, n)
	after := time.Now().Add(time.Second)
	got := getJob(t, db, job.ID)
	require.NotNil(t, got.Started)
	require.NotNil(t, got.Executed)
	for name, at := range map[string]time.Time{"added": got.Added, "started": *got.Started, "executed": *got.Executed} {
		assert.True(t, at.After(before) && at.Before(after), "%s %v is not between %v and %v", name, at, before, after)
	}
}

// No connection goes back to the pool inside a transaction, whatever way a
// run ends: committed, failed, panicked, or its statement failed.
func TestRunsLeaveNoTransactionOpen(t *testing.T) {
	eachServerDB(t, "SQLite has no server sessions to inspect", func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		var ids []int64
		wrote := map[string]int64{} // key: the effects its job leaves
		for i, task := range []any{writeEffect, failAfterWrite, panicAfterWrite, badSQL} {
			for j := range 5 {
				key := newKey(t, "open")
				opts := []async.Option{async.Args(key)}
				wrote[key] = 0
				if i == 0 {
					opts = []async.Option{async.Args(key, j)}
					wrote[key] = 1
				}
				job, err := async.Schedule(d.DB, task, opts...)
				require.NoError(t, err)
				ids = append(ids, job.ID)
			}
		}
		stop := startWorker(t, d.DB, async.WorkerOptions{Concurrency: 3, PollInterval: 20 * time.Millisecond})
		for _, id := range ids {
			waitJob(t, d.DB, id, time.Minute, "a first attempt", func(j *async.Job) bool {
				return j.Executed != nil || j.Failed != nil || j.Scheduled != nil && j.Attempts > 0 && j.LockedBy == ""
			})
		}
		stop()
		sqlDB, err := d.DB.DB()
		require.NoError(t, err)
		require.Positive(t, sqlDB.Stats().Idle, "the pool kept its connections")
		q := `SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'`
		if d.Kind == "mysql" {
			q = `SELECT COUNT(*) FROM information_schema.INNODB_TRX t JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id
				WHERE p.DB = DATABASE() AND p.ID <> CONNECTION_ID()`
		}
		var open int64
		require.NoError(t, d.DB.Raw(q).Scan(&open).Error)
		assert.Zero(t, open, "pooled connections with a transaction open")
		// A transaction left open would also have been committed by the
		// connection's next BEGIN (MySQL commits implicitly there).
		for key, n := range wrote {
			assert.Equal(t, n, effects(t, d.DB, key), "effects of %s", key)
		}
	})
}

// MySQL without MariaDB's compound statements: here a MariaDB reached
// through a GORM mysql dialector given a *sql.DB instead of a DSN (the
// plugin then cannot know the DSN's loc), which is also the path MySQL 8
// takes. The plugin says why at Initialize, and runs and claims go through
// database/sql transactions with statements prepared once per connection:
// each job once, failures rolled back and recorded, claims at READ
// COMMITTED, no transaction left open.
func TestMySQLWithoutCompoundStatements(t *testing.T) {
	d := newTestDB(t, "mysql", nil)
	migrateApp(t, d)
	sqlDB, err := sql.Open("mysql", d.DSN)
	require.NoError(t, err)
	sqlDB.SetMaxOpenConns(20)
	t.Cleanup(func() { _ = sqlDB.Close() })
	db, err := gorm.Open(mysql.New(mysql.Config{Conn: sqlDB}), &gorm.Config{Logger: logger.Default.LogMode(logger.Silent)})
	require.NoError(t, err)
	logs := newLogCapture()
	require.NoError(t, db.Use(&async.Plugin{Logger: logs.logger()}))
	info, err := async.Dialect(db)
	require.NoError(t, err)
	if !strings.Contains(info.Version, "MariaDB") {
		t.Skipf("not MariaDB (%s): the database/sql path is the only one, and the rest of the suite covers it", info.Version)
	}
	assert.Equal(t, 1, logs.count("compound statements unavailable"), "Initialize says why")

	keys := map[string]int64{} // key: the effects its job leaves
	var ids []int64
	for i := range 24 {
		key := newKey(t, "plain")
		var job *async.Job
		if i%8 == 7 {
			job, err = async.Schedule(db, failAfterWrite, async.Args(key))
			keys[key] = 0
		} else {
			job, err = async.Schedule(db, writeEffect, async.Args(key, i))
			keys[key] = 1
		}
		require.NoError(t, err)
		ids = append(ids, job.ID)
	}
	before := async.ChainedRuns()
	stop := startWorker(t, db, async.WorkerOptions{Concurrency: 3, PollInterval: 20 * time.Millisecond})
	for _, id := range ids {
		waitJob(t, db, id, time.Minute, "a first attempt", func(j *async.Job) bool {
			return j.Executed != nil || j.Scheduled != nil && j.Attempts > 0 && j.LockedBy == ""
		})
	}
	stop()
	assert.Zero(t, async.ChainedRuns()-before, "no chained runs without compound statements")
	for key, n := range keys {
		assert.Equal(t, n, effects(t, db, key), "effects of %s", key)
		assert.EqualValues(t, 1, runCount(key), "%s ran once", key)
	}
	assert.EqualValues(t, 3, count(t, db, "async_error", ""), "each failure recorded")

	// A claim's open transaction does not block Schedule (READ COMMITTED).
	paused, resume := make(chan struct{}), make(chan struct{})
	var once sync.Once
	defer async.SetClaimReadHook(func() { once.Do(func() { close(paused); <-resume }) })()
	scheduleCtl(t, db, newKey(t, "pending"))
	flushed := make(chan error, 1)
	go func() {
		_, err := async.FlushQueue(db, async.FlushOptions{Jobs: 10})
		flushed <- err
	}()
	recv(t, paused, time.Minute, "the claim to have read the pending jobs")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	_, err = async.Schedule(db.WithContext(ctx), ctlTask, async.Args(newKey(t, "during-claim")))
	cancel()
	close(resume)
	require.NoError(t, err, "Schedule while a claim's transaction is open")
	require.NoError(t, recv(t, flushed, time.Minute, "FlushQueue to end"))

	var open int64
	require.NoError(t, db.Raw(`SELECT COUNT(*) FROM information_schema.INNODB_TRX t JOIN information_schema.PROCESSLIST p
		ON p.ID = t.trx_mysql_thread_id WHERE p.DB = DATABASE() AND p.ID <> CONNECTION_ID()`).Scan(&open).Error)
	assert.Zero(t, open, "pooled connections with a transaction open")
}

// MariaDB: the statement that commits a run and begins the next returns no
// result set; the next run's fence count comes from its OK packet, and after
// an error a session variable tells whether the COMMIT had taken effect.
// Each case here would be misreported if the count or that check were
// wrong: a fence lost taken for one that holds, a committed run rolled back
// or rerun, a failed one reported committed.
func TestMariaCommitThenBeginReportsEachPart(t *testing.T) {
	d := newTestDB(t, "mysql", nil)
	info, err := async.Dialect(d.DB)
	require.NoError(t, err)
	if !strings.Contains(info.Version, "MariaDB") {
		t.Skipf("MariaDB only (compound statements); the server is %s", info.Version)
	}
	require.NoError(t, d.DB.Exec("CREATE TABLE mc (id INT PRIMARY KEY, n INT NOT NULL)").Error)
	require.NoError(t, d.DB.Exec("INSERT INTO mc (id, n) VALUES (1, 0), (2, 0)").Error)
	n := func(id int) (v int) {
		require.NoError(t, d.DB.Raw("SELECT n FROM mc WHERE id = ?", id).Scan(&v).Error)
		return v
	}
	const first, done = "UPDATE mc SET n = n + 1 WHERE id = 1", "UPDATE mc SET n = n + 10 WHERE id = 1"

	// The next run's fence holds: one row, and the first run committed.
	firstN, nextN, execErr, commitErr, beginErr, err := async.MariaCommitForTest(d.DB, first, done, "UPDATE mc SET n = n + 1 WHERE id = 2")
	require.NoError(t, err)
	require.NoError(t, execErr)
	require.NoError(t, commitErr)
	require.NoError(t, beginErr)
	assert.EqualValues(t, 1, firstN)
	assert.EqualValues(t, 1, nextN, "the next fence's row")
	assert.Equal(t, 11, n(1), "committed")
	assert.Equal(t, 0, n(2), "the next run's transaction rolled back")

	// The next run's fence finds nothing.
	_, nextN, execErr, _, beginErr, err = async.MariaCommitForTest(d.DB, first, done, "UPDATE mc SET n = n + 1 WHERE id = 3")
	require.NoError(t, err)
	require.NoError(t, execErr)
	require.NoError(t, beginErr)
	assert.EqualValues(t, 0, nextN, "a lost fence")
	assert.Equal(t, 22, n(1))

	// The next run's start fails after the COMMIT: the run committed.
	_, _, execErr, commitErr, beginErr, err = async.MariaCommitForTest(d.DB, first, done, "UPDATE mc_missing SET n = 1 WHERE id = 2")
	require.NoError(t, err)
	require.NoError(t, execErr, "the run's own part succeeded")
	require.NoError(t, commitErr)
	require.Error(t, beginErr, "the next run's start failed")
	assert.Equal(t, 33, n(1), "committed before the failure")

	// The completion fails before the COMMIT: nothing of the run commits.
	_, _, execErr, _, beginErr, err = async.MariaCommitForTest(d.DB, first, "UPDATE mc_missing SET n = 1 WHERE id = 1", "UPDATE mc SET n = n + 1 WHERE id = 2")
	require.NoError(t, err)
	require.Error(t, execErr, "the completion failed")
	require.NoError(t, beginErr)
	assert.Equal(t, 33, n(1), "the run rolled back")
	assert.Equal(t, 0, n(2))
}
