package async_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	mysqldrv "github.com/go-sql-driver/mysql"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// tcpProxy forwards connections to a database server; cut drops every
// connection and refuses new ones until restore, like a network outage.
type tcpProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	down   bool
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

func startProxy(t *testing.T, target string) *tcpProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &tcpProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		_ = ln.Close()
		p.cut()
		p.wg.Wait()
	})
	return p
}

func (p *tcpProxy) addr() string { return p.ln.Addr().String() }

func (p *tcpProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		down := p.down
		p.mu.Unlock()
		if down {
			_ = c.Close()
			continue
		}
		u, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = c.Close()
			continue
		}
		p.mu.Lock()
		if p.down { // cut while dialling
			p.mu.Unlock()
			_ = c.Close()
			_ = u.Close()
			continue
		}
		p.conns[c], p.conns[u] = struct{}{}, struct{}{}
		p.mu.Unlock()
		p.wg.Add(2)
		pipe := func(dst, src net.Conn) {
			defer p.wg.Done()
			_, _ = io.Copy(dst, src)
			_ = dst.Close()
			_ = src.Close()
		}
		go pipe(u, c)
		go pipe(c, u)
	}
}

// cut closes every proxied connection and refuses new ones.
func (p *tcpProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for c := range p.conns {
		_ = c.Close()
	}
	clear(p.conns)
}

func (p *tcpProxy) restore() {
	p.mu.Lock()
	p.down = false
	p.mu.Unlock()
}

// proxiedDSN returns d's DSN pointed at a proxy in front of its server.
func proxiedDSN(t *testing.T, d *testDB) (string, *tcpProxy) {
	t.Helper()
	switch d.Kind {
	case "postgres":
		u, err := url.Parse(d.DSN)
		require.NoError(t, err)
		target := u.Host
		if u.Port() == "" {
			target += ":5432"
		}
		p := startProxy(t, target)
		u.Host = p.addr()
		return u.String(), p
	case "mysql":
		cfg, err := mysqldrv.ParseDSN(d.DSN)
		require.NoError(t, err)
		p := startProxy(t, cfg.Addr)
		cfg.Addr = p.addr()
		return cfg.FormatDSN(), p
	}
	t.Fatalf("no proxy for %s", d.Kind)
	return "", nil
}

// scheduleKeys schedules ctlTask for n new keys and returns the keys.
func scheduleKeys(t *testing.T, db *gorm.DB, what string, n int, opts ...async.Option) []string {
	t.Helper()
	keys := make([]string, n)
	for i := range keys {
		keys[i] = newKey(t, what)
		scheduleCtl(t, db, keys[i], opts...)
	}
	return keys
}

// Point 9: when the database goes away under a running worker, it logs,
// retries with backoff and resumes by itself; no job is lost or committed
// twice. Postgres and MariaDB: a TCP proxy between the worker and the
// server drops every connection and refuses new ones for a while, with a
// job in the middle of its run. SQLite: another connection holds an
// exclusive lock for a while.
func TestWorkerSurvivesDatabaseOutage(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		logs := newLogCapture()
		var workerDB *gorm.DB
		var proxy *tcpProxy
		if d.Kind == "sqlite" {
			// Same file, but claims give up on a held lock after 100ms.
			path := strings.SplitN(d.DSN, "?", 2)[0]
			workerDB = secondHandle(t, d, path+"?_pragma=busy_timeout(100)&_pragma=journal_mode(WAL)", &async.Plugin{Logger: logs.logger()})
		} else {
			if d.Kind == "mysql" {
				// The driver logs every dropped connection: keep the output readable.
				_ = mysqldrv.SetLogger(log.New(io.Discard, "", 0))
				t.Cleanup(func() { _ = mysqldrv.SetLogger(log.New(os.Stderr, "[mysql] ", log.Ldate|log.Ltime|log.Lshortfile)) })
			}
			var dsn string
			dsn, proxy = proxiedDSN(t, d)
			workerDB = secondHandle(t, d, dsn, &async.Plugin{Logger: logs.logger()})
		}
		startWorker(t, workerDB, async.WorkerOptions{Concurrency: 3, Lease: 2 * time.Second, PollInterval: 50 * time.Millisecond})

		all := scheduleKeys(t, d.DB, "before", 8)
		waitFor(t, time.Minute, "the first jobs executed", func() bool { return count(t, d.DB, "async_job", "executed IS NULL") == 0 })

		if d.Kind == "sqlite" {
			// Due jobs the worker cannot claim while the lock is held.
			later := scheduleKeys(t, d.DB, "during", 5, async.RunAfter(d.Clock.Now().Add(time.Hour)))
			all = append(all, later...)
			sqlDB, err := d.DB.DB()
			require.NoError(t, err)
			conn, err := sqlDB.Conn(context.Background())
			require.NoError(t, err)
			_, err = conn.ExecContext(context.Background(), "BEGIN EXCLUSIVE")
			require.NoError(t, err)
			d.Clock.Advance(2 * time.Hour)
			logs.waitLog(t, "cannot claim jobs", 3, time.Minute)
			assert.Zero(t, count(t, d.DB, "async_job", "attempts > 0 AND executed IS NULL"), "nothing claimed under the lock")
			_, err = conn.ExecContext(context.Background(), "COMMIT")
			require.NoError(t, err)
			require.NoError(t, conn.Close())
		} else {
			// A job in the middle of its run when the connections drop.
			inflight := newKey(t, "inflight")
			started, release := make(chan int64, 10), make(chan struct{})
			on(t, inflight, func(ctx context.Context, run int64) error {
				if run == 1 {
					started <- run
					<-release
				}
				return nil
			})
			job := scheduleCtl(t, d.DB, inflight)
			all = append(all, inflight)
			recv(t, started, time.Minute, "the in-flight job to start")
			proxy.cut()
			all = append(all, scheduleKeys(t, d.DB, "during", 5)...)
			close(release)
			// Its commit fails and so does recording the failure: the job is
			// left to its lease.
			logs.waitLog(t, "could not record job failure", 1, time.Minute)
			logs.waitLog(t, "cannot claim jobs", 3, time.Minute)
			assert.Zero(t, effects(t, d.DB, inflight), "the in-flight run did not commit")
			assert.True(t, getJob(t, d.DB, job.ID).Pending())
			proxy.restore()
		}
		// The claim retries back off: the third waits longer than the first.
		delays := logs.attr("cannot claim jobs", "in")
		require.GreaterOrEqual(t, len(delays), 3)
		first, err := time.ParseDuration(delays[0])
		require.NoError(t, err)
		third, err := time.ParseDuration(delays[2])
		require.NoError(t, err)
		assert.Greater(t, third, first, "retry delays %v", delays)

		all = append(all, scheduleKeys(t, d.DB, "after", 5)...)
		waitFor(t, 2*time.Minute, "every job executed after the outage", func() bool {
			return count(t, d.DB, "async_job", "executed IS NULL") == 0
		})
		assert.EqualValues(t, len(all), count(t, d.DB, "async_job", ""))
		assert.EqualValues(t, len(all), count(t, d.DB, "effects", ""))
		for _, k := range all {
			assert.EqualValues(t, 1, effects(t, d.DB, k), "effects of %s", k)
		}
		assert.Zero(t, count(t, d.DB, "async_error", ""))
	})
}

// A running job's connection killed by the server (pg_terminate_backend on
// Postgres, KILL on MariaDB: an administrator, a failover, an idle-session
// timeout), while the worker's other connections live on: the run's
// writes are rolled back, its failure is recorded through another
// connection and the job rescheduled, and its next run commits its
// effects once. The worker goes on with other jobs.
func TestWorkerSurvivesItsJobConnectionKilled(t *testing.T) {
	eachServerDB(t, "SQLite has no server connection to kill", func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		if d.Kind == "mysql" {
			_ = mysqldrv.SetLogger(log.New(io.Discard, "", 0)) // the driver logs the dead connection
			t.Cleanup(func() { _ = mysqldrv.SetLogger(log.New(os.Stderr, "[mysql] ", log.Ldate|log.Ltime|log.Lshortfile)) })
		}
		key := newKey(t, "killed")
		started, release := make(chan int64, 10), make(chan struct{})
		on(t, key, func(ctx context.Context, run int64) error {
			if run == 1 {
				started <- run
				select {
				case <-release:
				case <-ctx.Done():
				}
			}
			return nil
		})
		job := scheduleCtl(t, d.DB, key)
		worker := secondHandle(t, d, d.DSN, nil)                                                         // its connections, not the test's
		startWorker(t, worker, async.WorkerOptions{Concurrency: 1, PollInterval: 20 * time.Millisecond}) // no claim while its job runs
		recv(t, started, time.Minute, "the job to start")

		// The job's connection: the one session with a transaction open.
		var ids []int64
		q := `SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'`
		if d.Kind == "mysql" {
			q = `SELECT p.ID FROM information_schema.INNODB_TRX t JOIN information_schema.PROCESSLIST p
				ON p.ID = t.trx_mysql_thread_id WHERE p.DB = DATABASE() AND p.ID <> CONNECTION_ID()`
		}
		require.NoError(t, d.DB.Raw(q).Scan(&ids).Error)
		require.Len(t, ids, 1, "one session holds the running job's transaction")
		if d.Kind == "postgres" {
			require.NoError(t, d.DB.Exec("SELECT pg_terminate_backend(?)", ids[0]).Error)
		} else {
			require.NoError(t, d.DB.Exec(fmt.Sprintf("KILL %d", ids[0])).Error)
		}
		close(release)

		got := waitJob(t, d.DB, job.ID, time.Minute, "the failure recorded", func(j *async.Job) bool { return j.LockedBy == "" })
		assert.True(t, got.Pending())
		require.NotNil(t, got.Scheduled, "rescheduled by the retry policy")
		assert.Equal(t, 1, got.Attempts)
		assert.Zero(t, effects(t, d.DB, key), "the killed run's write rolled back")
		assert.EqualValues(t, 1, count(t, d.DB, "async_error", "job_id = ?", job.ID))

		// The worker goes on, and runs the job again once it is due.
		other := scheduleCtl(t, d.DB, newKey(t, "next"))
		waitJob(t, d.DB, other.ID, time.Minute, "another job executed", executed)
		d.Clock.Advance(time.Hour)
		got = waitJob(t, d.DB, job.ID, time.Minute, "executed on its second attempt", executed)
		assert.Equal(t, 2, got.Attempts)
		assert.EqualValues(t, 1, effects(t, d.DB, key))
		assert.EqualValues(t, 2, runCount(key))
	})
}
