package async_test

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gormasync/async"
)

// ScheduleMany's bulk insert bypasses GORM's Create: these tests pin it to
// what Schedule writes, to the ids it returns, and to its transactions.

// insertMethods are the bulk insert methods each database can run: its own
// best first, then the others that work on it (Postgres's VALUES method is
// the one used with a driver other than pgx; "lastid" is MySQL's and old
// SQLite's).
func insertMethods(kind string) []string {
	switch kind {
	case "postgres":
		return []string{"", "unnest", "returning"}
	default:
		return []string{"", "returning", "lastid"}
	}
}

// acrossStatements is a number of jobs that a bulk insert with this method
// writes in more than one statement: at most 10,000 rows a statement with
// unnest (Postgres), 5957 with VALUES on Postgres and MySQL, 90 on SQLite.
func acrossStatements(kind, method string) int {
	switch {
	case kind == "sqlite":
		return 2500
	case kind == "postgres" && (method == "" || method == "unnest"):
		return 10050
	}
	return 6000
}

// scheduleManyWith runs ScheduleMany, or the bulk insert method named.
func scheduleManyWith(method string, tx *gorm.DB, calls ...async.Call) ([]*async.Job, error) {
	if method == "" {
		return async.ScheduleMany(tx, calls...)
	}
	return async.ScheduleManyWith(method, tx, calls...)
}

// rawJob reads a job row as the driver returns it, every column but id.
func rawJob(t testing.TB, db *gorm.DB, id int64) map[string]any {
	t.Helper()
	var rows []map[string]any
	require.NoError(t, db.Table("async_job").Where("id = ?", id).Find(&rows).Error)
	require.Len(t, rows, 1, "job %d", id)
	delete(rows[0], "id")
	return rows[0]
}

// Every column of a job written by ScheduleMany equals what Schedule writes
// for the same call: times, identity, queue, priority, meta, args, kwargs,
// max_attempts, group.
func TestScheduleManyWritesWhatScheduleWrites(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		freezeClock(d)
		at := time.Date(2031, 5, 6, 7, 8, 9, 123456789, time.FixedZone("X", 3*3600))
		ref := "many-" + d.Kind
		type call struct {
			task any
			opts []async.Option
		}
		specs := []call{
			{writeEffect, []async.Option{async.Args("plain", 1)}},
			{writeEffect, []async.Option{async.Args("plain", 1)}}, // the same identity again
			{writeEffect, []async.Option{async.Args("quote\"back\\slash 'é' ☃", -7), async.Priority(-3), async.Queue("q-" + d.Kind)}},
			{withResult, []async.Option{async.Args(2, 3), async.WithKwargs(async.Kwargs{"name": "x", "a": []int{1, 2}, "z": map[string]any{"b": 1, "a": nil}})}},
			{writeEffect, []async.Option{async.Args("later", 2), async.RunAfter(at), async.MaxAttempts(3)}},
			{writeEffect, []async.Option{async.Args("meta", 3), async.Meta(map[string]any{"tenant": 42, "tags": []string{"a", "b"}}), async.MaxAttempts(0)}},
			{"not.registered.here", []async.Option{async.Args(1.5, "x", nil, true, map[string]int{"k": 1})}},
			{"not.registered.here", nil},
			{writeEffect, []async.Option{async.Args("grouped", 4), async.InGroup(ref)}},
			{writeEffect, []async.Option{async.Args("grouped", 5), async.InGroup(ref), async.Priority(9)}},
			{writeEffect, []async.Option{async.Args("other-group", 6), async.InGroup(ref + "-2")}},
			// The same task and arguments as the call before, other keyword
			// arguments: another identity.
			{withResult, []async.Option{async.Args(2, 3), async.WithKwargs(async.Kwargs{"name": "x"})}},
			{withResult, []async.Option{async.Args(2, 3), async.WithKwargs(async.Kwargs{"name": "y"})}},
		}
		calls := make([]async.Call, len(specs))
		for i, c := range specs {
			calls[i] = async.Task(c.task, c.opts...)
		}
		for _, method := range insertMethods(d.Kind) {
			t.Run("method="+method, func(t *testing.T) {
				var one []*async.Job
				for _, c := range specs {
					j, err := async.Schedule(d.DB, c.task, c.opts...)
					require.NoError(t, err)
					one = append(one, j)
				}
				many, err := scheduleManyWith(method, d.DB, calls...)
				require.NoError(t, err)
				require.Len(t, many, len(calls))
				for i := range calls {
					require.NotZero(t, many[i].ID)
					a, b := *one[i], *many[i]
					a.ID, b.ID = 0, 0
					assert.Equal(t, a, b, "call %d: the returned jobs", i+1)
					assert.Equal(t, rawJob(t, d.DB, one[i].ID), rawJob(t, d.DB, many[i].ID), "call %d: the rows", i+1)
					assert.Equal(t, *getJob(t, d.DB, many[i].ID), *many[i], "call %d: the row read back", i+1)
				}
				assert.Equal(t, many[8].GroupID, many[9].GroupID)
				assert.NotEqual(t, *many[8].GroupID, *many[10].GroupID)
				assert.Equal(t, many[0].Identity, many[1].Identity)
				assert.NotEqual(t, many[0].Identity, many[2].Identity)
				assert.NotEqual(t, many[11].Identity, many[12].Identity)
			})
		}
	})
}

// The ids ScheduleMany returns are those of the rows of the same calls, in
// order, across chunks (statements) and with other ScheduleMany calls
// inserting at the same time.
func TestScheduleManyIDsMatchRowsAcrossChunks(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		for _, method := range insertMethods(d.Kind) {
			t.Run("method="+method, func(t *testing.T) {
				// Several statements by rows; by bytes (1 MiB a statement at
				// most); small calls.
				sizes := []struct {
					n    int
					meta int
				}{{acrossStatements(d.Kind, method), 0}, {1200, 2000}, {1, 0}, {91, 0}, {40, 60000}}
				for _, size := range sizes {
					var wg sync.WaitGroup
					for g := 0; g < 3; g++ {
						wg.Add(1)
						go func() {
							defer wg.Done()
							prefix := fmt.Sprintf("%s/%d/%d/%d", method, size.n, size.meta, g)
							calls := make([]async.Call, size.n)
							for i := range calls {
								opts := []async.Option{async.Args(fmt.Sprintf("%s/%d", prefix, i), i), async.Priority(i % 7)}
								if size.meta > 0 {
									opts = append(opts, async.Meta(map[string]any{"pad": strings.Repeat("m", size.meta)}))
								}
								calls[i] = async.Task(writeEffect, opts...)
							}
							jobs, err := scheduleManyWith(method, d.DB, calls...)
							if !assert.NoError(t, err) || !assert.Len(t, jobs, size.n) {
								return
							}
							var rows []async.Job
							if !assert.NoError(t, d.DB.Select("id", "args", "priority").Where("args LIKE ?", `["`+prefix+`/%`).Order("id").Find(&rows).Error) {
								return
							}
							byID := map[int64]async.Job{}
							for _, r := range rows {
								byID[r.ID] = r
							}
							assert.Len(t, byID, size.n)
							for i, j := range jobs {
								want := fmt.Sprintf(`["%s/%d",%d]`, prefix, i, i)
								if !assert.Equal(t, want, j.Args) || !assert.Equal(t, want, byID[j.ID].Args, "job %d (id %d)", i, j.ID) {
									return
								}
								assert.Equal(t, i%7, byID[j.ID].Priority)
							}
						}()
					}
					wg.Wait()
				}
			})
		}
	})
}

// All or nothing: a failure of the database in a later statement leaves no
// row of the call; in the caller's transaction it leaves the transaction
// usable, with what it did before.
func TestScheduleManyFailureInALaterStatementWritesNothing(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		switch d.Kind {
		case "sqlite":
			require.NoError(t, d.DB.Exec(`CREATE TRIGGER no_poison BEFORE INSERT ON async_job WHEN NEW.name = 'poison' BEGIN SELECT RAISE(ABORT, 'poison'); END`).Error)
		default:
			require.NoError(t, d.DB.Exec(`ALTER TABLE async_job ADD CONSTRAINT no_poison CHECK (name <> 'poison')`).Error)
		}
		for _, method := range insertMethods(d.Kind) {
			t.Run("method="+method, func(t *testing.T) {
				n := acrossStatements(d.Kind, method)
				calls := make([]async.Call, n)
				for i := range calls {
					calls[i] = async.Task(writeEffect, async.Args(fmt.Sprintf("poisoned-%d", i), i))
				}
				calls[n-2] = async.Task("poison") // in a later statement
				_, err := scheduleManyWith(method, d.DB, calls...)
				require.Error(t, err)
				assert.Contains(t, err.Error(), "async: schedule many: ")
				assert.Zero(t, count(t, d.DB, "async_job", ""))

				require.NoError(t, d.DB.Transaction(func(tx *gorm.DB) error {
					_, err := async.Schedule(tx, writeEffect, async.Args("before", 1))
					require.NoError(t, err)
					_, err = scheduleManyWith(method, tx, calls...)
					require.Error(t, err)
					// The transaction goes on (on Postgres too: the failed
					// statements ran in a savepoint).
					_, err = async.Schedule(tx, writeEffect, async.Args("after", 2))
					return err
				}))
				assert.EqualValues(t, 2, count(t, d.DB, "async_job", ""))
				assert.EqualValues(t, 0, count(t, d.DB, "async_job", "args LIKE ?", `["poisoned-%`))
				require.NoError(t, d.DB.Exec("DELETE FROM async_job").Error)
			})
		}
	})
}

// All or nothing on a rolled-back transaction and on a bad call in the
// middle, across statements.
func TestScheduleManyRollbackAndBadCallInTheMiddle(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		n := acrossStatements(d.Kind, "")
		calls := make([]async.Call, n)
		for i := range calls {
			calls[i] = async.Task(writeEffect, async.Args(fmt.Sprintf("rb-%d", i), i), async.InGroup(fmt.Sprintf("rb-%d", i%3)))
		}
		errRollback := errors.New("rollback")
		err := d.DB.Transaction(func(tx *gorm.DB) error {
			jobs, err := async.ScheduleMany(tx, calls...)
			require.NoError(t, err)
			require.Len(t, jobs, n)
			assert.EqualValues(t, n, count(t, tx, "async_job", ""), "visible in the transaction")
			return errRollback
		})
		require.ErrorIs(t, err, errRollback)
		assert.Zero(t, count(t, d.DB, "async_job", ""))
		assert.Zero(t, count(t, d.DB, "async_group", ""))

		bad := append([]async.Call(nil), calls...)
		bad[n/2] = async.Task(writeEffect, async.Args("missing-val"))
		_, err = async.ScheduleMany(d.DB, bad...)
		require.ErrorIs(t, err, async.ErrBadArguments)
		assert.ErrorContains(t, err, fmt.Sprintf("job %d of %d", n/2+1, n))
		bad[n/2] = async.Task(writeEffect, async.Args("bad-queue", 1), async.Queue(""))
		_, err = async.ScheduleMany(d.DB, bad...)
		require.ErrorIs(t, err, async.ErrBadOption)
		assert.Zero(t, count(t, d.DB, "async_job", ""))
		assert.Zero(t, count(t, d.DB, "async_group", ""))

		jobs, err := async.ScheduleMany(d.DB, calls...)
		require.NoError(t, err)
		assert.EqualValues(t, n, count(t, d.DB, "async_job", ""))
		assert.EqualValues(t, 3, count(t, d.DB, "async_group", ""))
		for i := 0; i < 3; i++ {
			assert.EqualValues(t, (n-i+2)/3, count(t, d.DB, "async_job", "group_id = ?", *jobs[i].GroupID))
		}
	})
}

// An idle worker of this process is woken when ScheduleMany's jobs commit:
// in the caller's transaction at its commit, on a plain handle at once (on
// Postgres with the NOTIFY trigger dropped, so that only the in-process
// wake-up can deliver).
func TestScheduleManyWakesWorkerOnCommit(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		idleWorkerInProcessOnly(t, d)

		auto, err := async.ScheduleMany(d.DB, async.Task(ctlTask, async.Args(newKey(t, "many-autocommit"))), async.Task(ctlTask, async.Args(newKey(t, "many-autocommit"))))
		require.NoError(t, err)
		for _, j := range auto {
			waitJob(t, d.DB, j.ID, 30*time.Second, "picked up after an autocommit ScheduleMany", executed)
		}

		var inTx []*async.Job
		require.NoError(t, d.DB.Transaction(func(tx *gorm.DB) error {
			inTx, err = async.ScheduleMany(tx, async.Task(ctlTask, async.Args(newKey(t, "many-in-tx"))))
			return err
		}))
		waitJob(t, d.DB, inTx[0].ID, 30*time.Second, "picked up after the transaction's commit", executed)

		// Through a fresh session of a transaction, as handlers pass it on.
		require.NoError(t, d.DB.Transaction(func(tx *gorm.DB) error {
			inTx, err = async.ScheduleMany(tx.Session(&gorm.Session{}).WithContext(t.Context()), async.Task(ctlTask, async.Args(newKey(t, "many-session"))))
			return err
		}))
		waitJob(t, d.DB, inTx[0].ID, 30*time.Second, "picked up after the session's transaction commit", executed)
	})
}

// On Postgres through pgx's simple protocol (GORM's PreferSimpleProtocol, as
// behind PgBouncer), where pgx writes the arrays as text, the rows are the
// same.
func TestScheduleManySimpleProtocolPostgres(t *testing.T) {
	d := newTestDB(t, "postgres", nil)
	at := time.Now().Add(time.Hour)
	cfg := &gorm.Config{Logger: logger.Default.LogMode(logger.Silent), NowFunc: func() time.Time { return at }}
	db, err := gorm.Open(postgres.New(postgres.Config{DSN: d.DSN, PreferSimpleProtocol: true}), cfg)
	require.NoError(t, err)
	sqlDB, err := db.DB()
	require.NoError(t, err)
	t.Cleanup(func() { _ = sqlDB.Close() })
	require.NoError(t, db.Use(&async.Plugin{SkipMigration: true, Logger: testLogger()}))

	opts := []async.Option{async.Args("quote\" back\\slash {brace}, comma", nil), async.InGroup("simple"),
		async.Meta(map[string]any{"k": "NULL"}), async.RunAfter(at.Add(time.Minute)), async.Queue("NULL")}
	many, err := async.ScheduleMany(db, async.Task("simple.task", opts...), async.Task("simple.task"))
	require.NoError(t, err)
	one, err := async.Schedule(db, "simple.task", opts...)
	require.NoError(t, err)
	assert.Equal(t, rawJob(t, db, one.ID), rawJob(t, db, many[0].ID))
	assert.Equal(t, "[]", getJob(t, db, many[1].ID).Args)
	assert.Nil(t, getJob(t, db, many[1].ID).GroupID)
}

// BenchmarkSchedule: one job per call on a plain handle (autocommit), for
// allocations per job (go test -run - -bench Schedule -benchtime 3000x).
func BenchmarkSchedule(b *testing.B) {
	for _, kind := range dbKinds {
		b.Run(kind, func(b *testing.B) {
			d := newTestDB(b, kind, nil)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := async.Schedule(d.DB, "bench.schedule", async.Args(i)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// Concurrent ScheduleMany calls with groups on a plain handle all succeed:
// on SQLite their transactions, which read the groups before they write,
// take the write lock first (as Schedule's do), where a read transaction's
// upgrade to a writer fails at once if another connection wrote meanwhile.
func TestConcurrentScheduleManyWithGroups(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		var wg sync.WaitGroup
		errs := make(chan error, 80)
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for r := range 10 {
					_, err := async.ScheduleMany(d.DB,
						async.Task(writeEffect, async.Args(fmt.Sprintf("g%d-r%d-a", g, r), 1), async.InGroup(fmt.Sprintf("ref-%d-%d", g, r))),
						async.Task(writeEffect, async.Args(fmt.Sprintf("g%d-r%d-b", g, r), 2)))
					errs <- err
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err)
		}
		assert.EqualValues(t, 160, count(t, d.DB, "async_job", ""))
		assert.EqualValues(t, 80, count(t, d.DB, "async_group", ""))
	})
}

// MySQL's multi-row INSERT without RETURNING (MySQL, MariaDB before 10.5)
// gives its rows ids auto_increment_increment apart, which replication
// topologies (Galera, group replication) set above one: the ids ScheduleMany
// returns are still the rows'.
func TestScheduleManyIDsFollowAutoIncrementIncrement(t *testing.T) {
	d := newTestDB(t, "mysql", nil)
	migrateApp(t, d)
	db := secondHandle(t, d, d.DSN+"&auto_increment_increment=3", nil) // as a three-node Galera cluster's sessions
	calls := make([]async.Call, 5)
	for i := range calls {
		calls[i] = async.Task(writeEffect, async.Args(fmt.Sprintf("step-%d", i), i))
	}
	jobs, err := async.ScheduleManyWith("lastid", db, calls...)
	require.NoError(t, err)
	for i, j := range jobs {
		var args string
		require.NoError(t, d.DB.Table("async_job").Select("args").Where("id = ?", j.ID).Scan(&args).Error)
		assert.Equal(t, fmt.Sprintf(`["step-%d",%d]`, i, i), args, "job %d: returned id %d", i, j.ID)
	}
}
