package async_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// The claim walks priorities and reads each one's due scheduled and
// unscheduled jobs as two index ranges (claim_walk.go). These tests pin the
// run order it must keep, whatever the claim's limit and however many jobs
// are scheduled for later, and check with the databases' own counters (or,
// on SQLite, the query plan) that a claim does not read the whole backlog.

// wantRunOrder is the reference's run order of the jobs due at now:
// priority, then due scheduled jobs by (scheduled, id), then unscheduled
// jobs by id.
func wantRunOrder(jobs []*async.Job, now time.Time) []int64 {
	var due []*async.Job
	for _, j := range jobs {
		if j.Scheduled == nil || !j.Scheduled.After(now) {
			due = append(due, j)
		}
	}
	sort.Slice(due, func(a, b int) bool {
		x, y := due[a], due[b]
		switch {
		case x.Priority != y.Priority:
			return x.Priority > y.Priority
		case (x.Scheduled == nil) != (y.Scheduled == nil):
			return x.Scheduled != nil
		case x.Scheduled != nil && !x.Scheduled.Equal(*y.Scheduled):
			return x.Scheduled.Before(*y.Scheduled)
		}
		return x.ID < y.ID
	})
	ids := make([]int64, len(due))
	for i, j := range due {
		ids[i] = j.ID
	}
	return ids
}

func jobIDs(jobs []*async.Job) []int64 {
	ids := make([]int64, len(jobs))
	for i, j := range jobs {
		ids[i] = j.ID
	}
	return ids
}

// Claims of any size take the first jobs in run order: successive claims of
// 1, 2, 3, ... jobs together take every due job, in order, past priorities
// that have only jobs scheduled for later, jobs of other queues and ties on
// the scheduled time; jobs scheduled for later are taken once due.
func TestClaimsTakeJobsInRunOrder(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		now := freezeClock(d)
		log := freshLog(t)
		at := func(dt time.Duration) *time.Time { x := now.Add(dt); return &x }
		var jobs []*async.Job
		n := 0
		sched := func(queue string, prio int, when *time.Time) {
			n++
			opts := []async.Option{async.Args(log, fmt.Sprint(n)), async.Priority(prio), async.Queue(queue)}
			if when != nil {
				opts = append(opts, async.RunAfter(*when))
			}
			j := mustSchedule(t, d.DB, parityRecord, opts...)
			if queue == async.DefaultQueue {
				jobs = append(jobs, j)
			}
		}
		// Jobs scheduled for later, interleaved with the due ones, at the
		// priorities that have due jobs and at one (7) that has none.
		future := func(prio, k int) {
			for i := 0; i < k; i++ {
				sched(async.DefaultQueue, prio, at(time.Duration(i+1)*time.Minute))
			}
		}
		future(9, 5)
		sched(async.DefaultQueue, 9, nil)
		sched(async.DefaultQueue, 9, at(-time.Minute))
		sched("other", 9, nil)
		sched("other", 9, at(-time.Hour))
		future(7, 4)
		sched(async.DefaultQueue, 9, at(-2*time.Minute))
		sched(async.DefaultQueue, 9, nil)
		for i := 0; i < 3; i++ {
			sched(async.DefaultQueue, 5, nil)
			sched(async.DefaultQueue, 5, at(-time.Minute)) // ties: by id
			future(5, 2)
			sched(async.DefaultQueue, 5, at(-time.Duration(3-i)*time.Hour))
		}
		sched(async.DefaultQueue, 5, at(0)) // due at exactly now
		future(4, 3)
		sched(async.DefaultQueue, 4, nil)
		sched(async.DefaultQueue, 4, at(-time.Second))
		sched(async.DefaultQueue, -3, nil)
		future(-5, 2)

		want := wantRunOrder(jobs, now)
		require.Len(t, want, 17)
		var got []int64
		owner := "claims-" + d.Kind
		for limit := 1; ; limit++ {
			claimed, err := async.ClaimForTest(d.DB, owner, limit, async.DefaultQueue)
			require.NoError(t, err)
			got = append(got, jobIDs(claimed)...)
			if len(claimed) < limit {
				break
			}
		}
		assert.Equal(t, want, got, "successive claims take the due jobs in run order")

		// Once the later jobs are due, they come in run order too, behind
		// nothing (the others are leased).
		d.Clock.Advance(time.Hour)
		later := wantRunOrder(jobs, frozenNow(d))[len(want):]
		var rest []*async.Job
		for _, j := range jobs {
			if j.Scheduled != nil && j.Scheduled.After(now) {
				rest = append(rest, j)
			}
		}
		require.Len(t, later, len(rest))
		claimed, err := async.ClaimForTest(d.DB, owner, 7, async.DefaultQueue)
		require.NoError(t, err)
		laterWant := wantRunOrder(rest, frozenNow(d))
		assert.Equal(t, laterWant[:7], jobIDs(claimed))
		claimed, err = async.ClaimForTest(d.DB, owner, 100, async.DefaultQueue)
		require.NoError(t, err)
		assert.Equal(t, laterWant[7:], jobIDs(claimed))

		// Unrestricted claims see the other queue's jobs.
		claimed, err = async.ClaimForTest(d.DB, owner, 10)
		require.NoError(t, err)
		assert.Len(t, claimed, 2)
	})
}

// backlog bulk-inserts pending jobs of priority 5: future ones scheduled
// for tomorrow, unscheduled ones, and due scheduled ones.
func backlog(t *testing.T, d *testDB, future, unscheduled, due int) {
	t.Helper()
	now := frozenNow(d)
	tomorrow, past := now.Add(24*time.Hour), now.Add(-time.Hour)
	var rows []async.Job
	add := func(k int, at *time.Time) {
		for i := 0; i < k; i++ {
			rows = append(rows, async.Job{Name: "test.backlog", Queue: async.DefaultQueue, Args: "[]", Kwargs: "{}", Meta: "{}",
				Priority: 5, Identity: "backlog", Added: now, Scheduled: at, MaxAttempts: 25})
		}
	}
	add(future, &tomorrow)
	add(unscheduled, nil)
	add(due, &past)
	require.NoError(t, d.DB.Session(&gorm.Session{SkipHooks: true}).CreateInBatches(rows, 500).Error)
	if d.Kind == "postgres" {
		require.NoError(t, d.DB.Exec("VACUUM ANALYZE async_job").Error)
	}
	if d.Kind == "mysql" {
		require.NoError(t, d.DB.Exec("ANALYZE TABLE async_job").Error)
	}
}

// A claim reads about as many index entries as it claims, not the backlog:
// 30,000 jobs scheduled for tomorrow and 10,000 unscheduled ones at the
// claimed jobs' priority. Postgres: the shared buffers EXPLAIN ANALYZE
// counts for the claim statement; MySQL/MariaDB: the session's handler
// reads (index entries read, also those index condition pushdown rejected)
// over a whole claim; SQLite, which has no such counters: the claim's plan
// reads only index ranges bound to a priority. Each check is first shown to
// see the backlog in a query that reads all pending jobs in run order.
func TestClaimDoesNotReadTheBacklog(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		freezeClock(d)
		const future, unscheduled, due = 30_000, 10_000, 5
		backlog(t, d, future, unscheduled, due)
		// The naive read: every due job in run order, one query.
		const pendingJobs = "j.executed IS NULL AND j.cancelled IS NULL AND j.failed IS NULL"
		naive := "SELECT j.id FROM async_job j WHERE " + pendingJobs + " AND (j.scheduled IS NULL OR j.scheduled <= ?) ORDER BY j.priority DESC, " +
			map[string]string{"postgres": "", "mysql": "j.scheduled IS NULL, ", "sqlite": "(j.scheduled IS NULL), "}[d.Kind] + "j.scheduled, j.id LIMIT " + fmt.Sprint(due+5)
		now := frozenNow(d)
		switch d.Kind {
		case "postgres":
			// generic: the plan a prepared statement settles on after five
			// executions (the claim's limits are literals for that), which
			// knows none of the parameters.
			buffers := func(generic bool, q string, args ...any) int {
				var plan string
				require.ErrorIs(t, d.DB.Transaction(func(tx *gorm.DB) error {
					if !generic {
						if err := tx.Raw("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "+q, args...).Row().Scan(&plan); err != nil {
							return err
						}
						return errRollback
					}
					n := 0
					numbered := regexp.MustCompile(`\?`).ReplaceAllStringFunc(q, func(string) string { n++; return fmt.Sprintf("$%d", n) })
					if err := tx.Exec("SET LOCAL plan_cache_mode = force_generic_plan").Error; err != nil {
						return err
					}
					if err := tx.Exec("PREPARE claim_generic AS " + numbered).Error; err != nil {
						return err
					}
					defer tx.Exec("DEALLOCATE claim_generic")
					// EXPLAIN takes no parameters: literals.
					var params []string
					for _, a := range args {
						switch v := a.(type) {
						case time.Time:
							params = append(params, "'"+v.Format(time.RFC3339Nano)+"'")
						case string:
							params = append(params, "'"+strings.ReplaceAll(v, "'", "''")+"'")
						default:
							params = append(params, fmt.Sprint(v))
						}
					}
					if err := tx.Raw("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE claim_generic(" + strings.Join(params, ", ") + ")").Row().Scan(&plan); err != nil {
						return err
					}
					return errRollback
				}), errRollback)
				var out []struct {
					Plan struct {
						Hit  int `json:"Shared Hit Blocks"`
						Read int `json:"Shared Read Blocks"`
					} `json:"Plan"`
				}
				require.NoError(t, json.Unmarshal([]byte(plan), &out))
				return out[0].Plan.Hit + out[0].Plan.Read
			}
			control := buffers(false, naive, now)
			qs, args, err := async.ClaimStatementsForTest(d.DB, due+5, async.DefaultQueue)
			require.NoError(t, err)
			got, generic := buffers(false, qs[0], args[0]...), buffers(true, qs[0], args[0]...)
			t.Logf("shared buffers: claim %d (generic plan %d), naive query %d", got, generic, control)
			assert.Greater(t, control, 100, "the naive query reads the backlog")
			assert.Less(t, got, 50, "the claim reads few index and heap pages")
			assert.Less(t, generic, 50, "so does its generic plan")
		case "mysql":
			// Session counters, read in the transaction that runs the
			// query: on its connection.
			reads := func(run func(tx *gorm.DB)) (n int) {
				read := func(tx *gorm.DB) int {
					rows, err := tx.Raw("SHOW SESSION STATUS WHERE Variable_name IN ('Handler_read_key', 'Handler_read_next', 'Handler_read_prev', 'Handler_icp_attempts')").Rows()
					require.NoError(t, err)
					defer rows.Close()
					sum := 0
					for rows.Next() {
						var name string
						var v int
						require.NoError(t, rows.Scan(&name, &v))
						sum += v
					}
					return sum
				}
				require.ErrorIs(t, d.DB.Transaction(func(tx *gorm.DB) error {
					before := read(tx)
					run(tx)
					n = read(tx) - before
					return errRollback
				}), errRollback)
				return n
			}
			control := reads(func(tx *gorm.DB) {
				var ids []int64
				require.NoError(t, tx.Raw(naive, now).Scan(&ids).Error)
			})
			var claimed []*async.Job
			got := reads(func(tx *gorm.DB) {
				var err error
				claimed, err = async.SelectClaimableForTest(tx, due+5, async.DefaultQueue)
				require.NoError(t, err)
			})
			t.Logf("handler reads: claim %d, naive query %d", got, control)
			assert.Greater(t, control, future, "the naive query reads the backlog")
			assert.Less(t, got, 200, "the claim reads few index entries")
			assert.Len(t, claimed, due+5)
		case "sqlite":
			plan := func(q string, args ...any) string { return sqlitePlan(t, d.DB, q, args...) }
			control := plan(naive, now)
			assert.Contains(t, control, "SCAN j USING INDEX async_job_pending", "the naive query scans the index")
			qs, args, err := async.ClaimStatementsForTest(d.DB, due+5, async.DefaultQueue)
			require.NoError(t, err)
			for i, q := range qs {
				got := plan(q, args[i]...)
				t.Logf("plan of %s:\n%s", q, got)
				assert.NotContains(t, got, "TEMP B-TREE", "read in index order")
				assert.NotRegexp(t, `SCAN [jd]\b`, got, "no scan of the index")
				if i >= 3 {
					assert.Contains(t, got, "SEARCH j USING INDEX async_job_pending (priority=? AND <expr>=?", "an exact range of one priority")
				} else {
					assert.Regexp(t, `(SCAN|SEARCH) t USING INDEX async_job_pending`, got, "the probe reads the index's first entry")
					assert.Contains(t, got, "SEARCH d USING INDEX async_job_pending (priority=? AND <expr>=? AND scheduled<?)", "the probe for due jobs seeks them")
				}
			}
		}
		// And the claims take the due scheduled jobs first, then the
		// unscheduled ones, and none of tomorrow's.
		claimed, err := async.ClaimForTest(d.DB, "check", due+5, async.DefaultQueue)
		require.NoError(t, err)
		require.NotEmpty(t, claimed)
		for i, j := range claimed {
			if j.Scheduled != nil {
				assert.False(t, j.Scheduled.After(now), "job %d is not due", j.ID)
			} else {
				assert.Nil(t, claimed[min(i+1, len(claimed)-1)].Scheduled, "unscheduled jobs come after the due scheduled ones")
			}
		}
	})
}

var errRollback = fmt.Errorf("rollback")

// claimStress is the task of TestConcurrentWorkersRunWithoutFailures.
func claimStress(context.Context, *gorm.DB, int) error { return nil }

var claimStressName = async.MustRegister(claimStress)

// Workers in two processes (two plugin instances, each with its own pool)
// at concurrency 8 in all, strict and with group commit, run a queue dry
// without a single failed run. On MariaDB, claims and completions used to
// deadlock (Error 1213): the failed run was recorded and the job delayed.
func TestConcurrentWorkersRunWithoutFailures(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		for _, batch := range []int{1, 4} {
			const jobs = 600
			for i := 0; i < jobs; i++ {
				mustSchedule(t, d.DB, claimStress, async.Args(i))
			}
			other := secondHandle(t, d, d.DSN, nil)
			var stops []func()
			for _, db := range []*gorm.DB{d.DB, other} {
				stops = append(stops, startWorker(t, db, async.WorkerOptions{Concurrency: 4, BatchSize: batch, PollInterval: 20 * time.Millisecond}))
			}
			waitFor(t, 2*time.Minute, "the queue run dry", func() bool {
				return count(t, d.DB, "async_job", "executed IS NULL AND name = ?", claimStressName) == 0
			})
			for _, stop := range stops {
				stop()
			}
			assert.Zero(t, count(t, d.DB, "async_error", ""), "no run failed (batch size %d)", batch)
			assert.Zero(t, count(t, d.DB, "async_job", "attempts <> 1"), "every job ran once (batch size %d)", batch)
		}
	})
}

// A claim row-locks the jobs it takes and leaves the other pending jobs
// free: while a claim's transaction is open, another transaction completes
// any other job at once. MariaDB's claims used to lock every pending row
// their first read passed over until they committed: completions waited
// for claims, and a claim whose second read then came to a row held by a
// waiting completion deadlocked with it. (One exception remains on
// MariaDB: a read that runs to the end of its index range also keeps the
// lock of the entry that ended it, the first one past the range; the claim
// here stops within its range.)
func TestClaimLocksOnlyTheJobsItTakes(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		if d.Kind == "sqlite" {
			t.Skip("SQLite has no row locks: a claim holds the database's write lock")
		}
		now := freezeClock(d)
		log := freshLog(t)
		var due, others []*async.Job
		for i := 0; i < 3; i++ {
			others = append(others, mustSchedule(t, d.DB, parityRecord, async.Args(log, fmt.Sprint("u", i))))
			due = append(due, mustSchedule(t, d.DB, parityRecord, async.Args(log, fmt.Sprint("d", i)), async.RunAfter(now.Add(-time.Minute))))
			others = append(others, mustSchedule(t, d.DB, parityRecord, async.Args(log, fmt.Sprint("f", i)), async.RunAfter(now.Add(time.Hour))))
		}
		others = append(others, due[2])
		claim := d.DB.Begin(&sql.TxOptions{Isolation: sql.LevelReadCommitted})
		require.NoError(t, claim.Error)
		defer claim.Rollback()
		claimed, err := async.SelectClaimableForTest(claim, 2, async.DefaultQueue)
		require.NoError(t, err)
		require.Equal(t, jobIDs(due[:2]), jobIDs(claimed))

		for _, j := range others {
			err := d.DB.Transaction(func(tx *gorm.DB) error {
				timeout := map[string]string{"postgres": "SET LOCAL lock_timeout = '2s'", "mysql": "SET SESSION innodb_lock_wait_timeout = 2"}[d.Kind]
				if err := tx.Exec(timeout).Error; err != nil {
					return err
				}
				return tx.Exec("UPDATE async_job SET executed = ? WHERE id = ?", now, j.ID).Error
			})
			assert.NoError(t, err, "job %d, which the claim did not take, is not locked", j.ID)
		}
	})
}

// A MySQL/MariaDB claim takes no gap locks (it reads at READ COMMITTED):
// while its transaction is open, after its locking reads ran to the end of
// the pending jobs, Schedule still inserts jobs into the range it read.
// Under REPEATABLE READ the insert would wait for the claim's next-key lock.
func TestClaimDoesNotBlockSchedule(t *testing.T) {
	d := newTestDB(t, "mysql", nil)
	migrateApp(t, d)
	for range 3 {
		scheduleCtl(t, d.DB, newKey(t, "pending"))
	}
	paused, resume := make(chan struct{}), make(chan struct{})
	var once sync.Once
	defer async.SetClaimReadHook(func() { once.Do(func() { close(paused); <-resume }) })()
	flushed := make(chan error, 1)
	go func() {
		_, err := async.FlushQueue(d.DB, async.FlushOptions{Jobs: 10})
		flushed <- err
	}()
	recv(t, paused, time.Minute, "the claim to have read the pending jobs")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	_, err := async.Schedule(d.DB.WithContext(ctx), ctlTask, async.Args(newKey(t, "during-claim")))
	cancel()
	close(resume)
	require.NoError(t, err, "Schedule while a claim's transaction is open")
	require.NoError(t, recv(t, flushed, time.Minute, "FlushQueue to end"))
	assert.Zero(t, count(t, d.DB, "async_job", "executed IS NULL AND cancelled IS NULL AND failed IS NULL"), "all four jobs ran")
}
