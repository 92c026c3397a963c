package async_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"
	"gorm.io/gorm/utils/tests"

	"github.com/gormasync/async"
)

// Effect is a row a task writes, keyed by a unique key: a second run of the
// same job would violate the constraint.
type Effect struct {
	ID  int64  `gorm:"primaryKey"`
	K   string `gorm:"column:k;size:100;uniqueIndex"`
	Val int
}

// Order schedules a job from its AfterCreate hook, in its own transaction.
type Order struct {
	ID   int64 `gorm:"primaryKey"`
	Item string
}

func (o *Order) AfterCreate(tx *gorm.DB) error {
	_, err := async.Schedule(tx, "test.ship", async.Args(o.ID, o.Item))
	return err
}

var runs sync.Map // job key -> *atomic.Int64, counts task invocations

func runCount(key string) int64 {
	v, _ := runs.LoadOrStore(key, new(atomic.Int64))
	return v.(*atomic.Int64).Load()
}

func countRun(key string) {
	v, _ := runs.LoadOrStore(key, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

func writeEffect(ctx context.Context, tx *gorm.DB, key string, val int) error {
	countRun(key)
	return tx.Create(&Effect{K: key, Val: val}).Error
}

func failAfterWrite(ctx context.Context, tx *gorm.DB, key string) error {
	countRun(key)
	if err := tx.Create(&Effect{K: key}).Error; err != nil {
		return err
	}
	return errors.New("boom after write")
}

func panicAfterWrite(ctx context.Context, tx *gorm.DB, key string) error {
	if err := tx.Create(&Effect{K: key}).Error; err != nil {
		return err
	}
	panic("kaboom")
}

var errPanicValue = errors.New("the value a task panicked with")

func panicWithError(ctx context.Context, tx *gorm.DB, key string) error {
	panic(fmt.Errorf("wrapped: %w", errPanicValue))
}

func badSQL(ctx context.Context, tx *gorm.DB, key string) error {
	if err := tx.Create(&Effect{K: key}).Error; err != nil {
		return err
	}
	return tx.Exec("INSERT INTO no_such_table (x) VALUES (1)").Error
}

func unencodable(ctx context.Context, tx *gorm.DB, key string) (any, error) {
	if err := tx.Create(&Effect{K: key}).Error; err != nil {
		return nil, err
	}
	return func() {}, nil
}

func withResult(ctx context.Context, tx *gorm.DB, a, b int, kw async.Kwargs) (map[string]any, error) {
	return map[string]any{"sum": a + b, "kw": kw["name"]}, nil
}

func ship(ctx context.Context, tx *gorm.DB, id int64, item string) error {
	return tx.Create(&Effect{K: fmt.Sprintf("ship-%d", id)}).Error
}

func init() {
	async.MustRegister(writeEffect)
	async.MustRegister(failAfterWrite)
	async.MustRegister(panicAfterWrite)
	async.MustRegister(panicWithError)
	async.MustRegister(badSQL)
	async.MustRegister(unencodable)
	async.MustRegister(withResult)
	if err := async.RegisterAs("test.ship", ship); err != nil {
		panic(err)
	}
}

func migrateApp(t testing.TB, d *testDB) {
	t.Helper()
	require.NoError(t, d.DB.AutoMigrate(&Effect{}, &Order{}))
}

func getJob(t testing.TB, db *gorm.DB, id int64) *async.Job {
	t.Helper()
	var j async.Job
	require.NoError(t, db.Where("id = ?", id).Take(&j).Error)
	return &j
}

// Semantic 1: Schedule joins the caller's transaction.
func TestScheduleIsTransactional(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		errRollback := errors.New("rollback")
		err := d.DB.Transaction(func(tx *gorm.DB) error {
			_, err := async.Schedule(tx, writeEffect, async.Args("rolled-back", 1))
			require.NoError(t, err)
			return errRollback
		})
		require.ErrorIs(t, err, errRollback)
		assert.Zero(t, count(t, d.DB, "async_job", ""), "a rolled-back Schedule must leave no job")

		require.NoError(t, d.DB.Transaction(func(tx *gorm.DB) error {
			_, err := async.Schedule(tx, writeEffect, async.Args("committed", 1))
			return err
		}))
		assert.EqualValues(t, 1, count(t, d.DB, "async_job", ""))

		// A plain handle commits at once.
		_, err = async.Schedule(d.DB, writeEffect, async.Args("autocommit", 1))
		require.NoError(t, err)
		assert.EqualValues(t, 2, count(t, d.DB, "async_job", ""))
	})
}

// Semantic 1: scheduling from a model's AfterCreate hook.
func TestScheduleFromAfterCreateHook(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		errRollback := errors.New("rollback")
		err := d.DB.Transaction(func(tx *gorm.DB) error {
			require.NoError(t, tx.Create(&Order{Item: "lost"}).Error)
			return errRollback
		})
		require.ErrorIs(t, err, errRollback)
		assert.Zero(t, count(t, d.DB, "orders", ""))
		assert.Zero(t, count(t, d.DB, "async_job", ""))

		// GORM wraps a single Create in its own transaction: the hook's job
		// commits with the row.
		require.NoError(t, d.DB.Create(&Order{Item: "kept"}).Error)
		assert.EqualValues(t, 1, count(t, d.DB, "orders", ""))
		assert.EqualValues(t, 1, count(t, d.DB, "async_job", "name = ?", "test.ship"))
		n, err := async.FlushQueue(d.DB, async.FlushOptions{})
		require.NoError(t, err)
		assert.Equal(t, 1, n)
		assert.EqualValues(t, 1, count(t, d.DB, "effects", "k LIKE ?", "ship-%"))
	})
}

// Semantic 2: the task's writes and the job's completion commit together.
func TestExecuteCommitsWritesWithCompletion(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		job, err := async.Schedule(d.DB, withResult, async.Args(2, 3), async.WithKwargs(async.Kwargs{"name": "x"}))
		require.NoError(t, err)
		require.NoError(t, job.Execute(d.DB))
		got := getJob(t, d.DB, job.ID)
		require.NotNil(t, got.Executed)
		require.NotNil(t, got.Started)
		assert.False(t, got.Started.After(*got.Executed))
		assert.JSONEq(t, `{"sum":5,"kw":"x"}`, got.Result)
		assert.Equal(t, 1, got.Attempts)
		assert.Equal(t, 25, got.MaxAttempts, "the default, as documented")
		assert.Empty(t, got.LockedBy)
		// The job Execute was called on is the job as run.
		require.NotNil(t, job.Executed)
		assert.True(t, got.Executed.Equal(*job.Executed))
		assert.Equal(t, got.Result, job.Result)
		assert.Equal(t, 1, job.Attempts)

		job, err = async.Schedule(d.DB, writeEffect, async.Args("exec-write", 7))
		require.NoError(t, err)
		require.NoError(t, job.Execute(d.DB))
		assert.EqualValues(t, 1, count(t, d.DB, "effects", "k = ? AND val = 7", "exec-write"))
		got = getJob(t, d.DB, job.ID)
		assert.NotNil(t, got.Executed)
		assert.Equal(t, "null", got.Result, "a task without a result: JSON null")
		// An executed job is not run again.
		assert.ErrorIs(t, job.Execute(d.DB), async.ErrNotPending)
	})
}

// Job.Execute does not take a job a worker holds a live lease on (it is
// running, or claimed to run next): both would run its task. Once the lease
// has expired (its worker died), Execute runs it.
func TestExecuteRefusesJobLeasedToAWorker(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		job, err := async.Schedule(d.DB, writeEffect, async.Args("leased", 1))
		require.NoError(t, err)
		claimed, err := async.ClaimForTest(d.DB, "other-worker", 1)
		require.NoError(t, err)
		require.Len(t, claimed, 1)

		err = job.Execute(d.DB)
		require.ErrorIs(t, err, async.ErrJobClaimed)
		assert.ErrorContains(t, err, "other-worker")
		got := getJob(t, d.DB, job.ID)
		assert.Equal(t, "other-worker", got.LockedBy, "the lease stays with its worker")
		assert.Equal(t, 1, got.Attempts, "a refused Execute counts no attempt")
		assert.Zero(t, count(t, d.DB, "effects", "k = ?", "leased"))

		d.Clock.Advance(25 * time.Hour) // past ClaimForTest's lease of a day
		require.NoError(t, job.Execute(d.DB))
		assert.EqualValues(t, 1, count(t, d.DB, "effects", "k = ?", "leased"))
		assert.Equal(t, 2, getJob(t, d.DB, job.ID).Attempts)
	})
}

// An id no job has: Retry and Job.Execute return an error wrapping
// ErrJobNotFound, which a job in the wrong state does not get.
func TestUnknownJobIDIsErrJobNotFound(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		job := scheduleCtl(t, d.DB, newKey(t, "known"))
		missing := job.ID + 1000
		err := async.Retry(d.DB, missing)
		assert.ErrorIs(t, err, async.ErrJobNotFound)
		assert.Regexp(t, `^async: `, err.Error())
		assert.ErrorIs(t, (&async.Job{ID: missing}).Execute(d.DB), async.ErrJobNotFound)

		err = async.Retry(d.DB, job.ID)
		assert.ErrorIs(t, err, async.ErrBadOption, "a pending job is found, and cannot be retried")
		assert.NotErrorIs(t, err, async.ErrJobNotFound)
		require.NoError(t, job.Execute(d.DB))
		err = job.Execute(d.DB)
		assert.ErrorIs(t, err, async.ErrNotPending)
		assert.NotErrorIs(t, err, async.ErrJobNotFound)
	})
}

func backoff(n int) time.Duration {
	return time.Duration(60 * math.Pow(float64(n), 1.6) * float64(time.Second))
}

// Semantic 3: a failing task's writes roll back, the error is recorded with
// its stack and the job is rescheduled at now + 60·n^1.6 s.
func TestFailureRollsBackRecordsAndReschedules(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		job, err := async.Schedule(d.DB, failAfterWrite, async.Args("fail-1"))
		require.NoError(t, err)
		for n := 1; n <= 3; n++ {
			before := d.Clock.Now().UTC()
			err := job.Execute(d.DB)
			require.ErrorContains(t, err, "boom after write")
			got := getJob(t, d.DB, job.ID)
			assert.Nil(t, got.Executed, "a failed job is not executed")
			assert.Nil(t, got.Started)
			assert.Equal(t, 5-n, got.Priority, "priority drops by one per failure")
			require.NotNil(t, got.Scheduled)
			want := before.Add(backoff(n))
			assert.WithinDuration(t, want, *got.Scheduled, 2*time.Second, "attempt %d", n)
			assert.Zero(t, count(t, d.DB, "effects", "k = ?", "fail-1"), "the task's write must be rolled back")
			assert.EqualValues(t, n, count(t, d.DB, "async_error", "job_id = ?", job.ID))
		}
		var e async.JobError
		require.NoError(t, d.DB.Where("job_id = ?", job.ID).Order("id").First(&e).Error)
		assert.Contains(t, e.Exception, "boom after write")
		assert.Contains(t, e.Traceback, "goroutine")
	})
}

func TestPanicIsRecordedAsFailure(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		job, err := async.Schedule(d.DB, panicAfterWrite, async.Args("panic-1"))
		require.NoError(t, err)
		err = job.Execute(d.DB)
		require.ErrorIs(t, err, async.ErrTaskPanicked)
		assert.ErrorContains(t, err, "kaboom")
		assert.Zero(t, count(t, d.DB, "effects", ""))
		var e async.JobError
		require.NoError(t, d.DB.Where("job_id = ?", job.ID).Take(&e).Error)
		assert.Contains(t, e.Traceback, "panicAfterWrite", "the stack names the panicking function")
		assert.Nil(t, getJob(t, d.DB, job.ID).Executed)

		// A panic with an error: the error stays reachable through errors.Is.
		job, err = async.Schedule(d.DB, panicWithError, async.Args("panic-2"))
		require.NoError(t, err)
		err = job.Execute(d.DB)
		assert.ErrorIs(t, err, async.ErrTaskPanicked)
		assert.ErrorIs(t, err, errPanicValue)
	})
}

// Semantic 3, Postgres part: a failed SQL statement aborts the transaction,
// yet the failure is recorded (the savepoint around the task).
func TestFailedStatementIsRecorded(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		job, err := async.Schedule(d.DB, badSQL, async.Args("bad-sql"))
		require.NoError(t, err)
		require.Error(t, job.Execute(d.DB))
		assert.EqualValues(t, 1, count(t, d.DB, "async_error", "job_id = ?", job.ID))
		assert.Zero(t, count(t, d.DB, "effects", ""))
		got := getJob(t, d.DB, job.ID)
		assert.Nil(t, got.Executed)
		assert.NotNil(t, got.Scheduled)
	})
}

// Semantic 4: an unencodable result is a failure; executed stays empty.
func TestUnencodableResultIsFailure(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		job, err := async.Schedule(d.DB, unencodable, async.Args("unenc"))
		require.NoError(t, err)
		require.ErrorIs(t, job.Execute(d.DB), async.ErrBadResult)
		got := getJob(t, d.DB, job.ID)
		assert.Nil(t, got.Executed)
		assert.Empty(t, got.Result)
		assert.Zero(t, count(t, d.DB, "effects", ""), "the task's write must be rolled back")
		assert.EqualValues(t, 1, count(t, d.DB, "async_error", "job_id = ?", job.ID))
	})
}

// Semantic 5: unknown task and stored arguments that do not fit fail the run.
func TestUnknownTaskAndBadStoredArgsFail(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		job, err := async.Schedule(d.DB, "nobody.registered", async.Args(1))
		require.NoError(t, err, "a producer may schedule a task it does not register")
		err = job.Execute(d.DB)
		require.ErrorIs(t, err, async.ErrUnknownTask)
		var e async.JobError
		require.NoError(t, d.DB.Where("job_id = ?", job.ID).Take(&e).Error)
		assert.Contains(t, e.Exception, "nobody.registered")

		bad, err := async.Schedule(d.DB, writeEffect, async.Args("k", 1))
		require.NoError(t, err)
		require.NoError(t, d.DB.Model(&async.Job{}).Where("id = ?", bad.ID).Update("args", `["k", "not-a-number"]`).Error)
		err = bad.Execute(d.DB)
		require.ErrorIs(t, err, async.ErrBadArguments)
		assert.ErrorContains(t, err, "argument 2")
		require.NoError(t, d.DB.Model(&async.Job{}).Where("id = ?", bad.ID).Update("args", `not json`).Error)
		require.ErrorIs(t, bad.Execute(d.DB), async.ErrBadArguments)
		assert.EqualValues(t, 2, count(t, d.DB, "async_error", "job_id = ?", bad.ID))
	})
}

// Semantic 6: concurrent flush_queue runs never run the same job twice, even
// when their partition locks overlap (a lock that expired under a slow run).
func TestConcurrentFlushQueuesRunEachJobOnce(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		const m = 40
		prefix := fmt.Sprintf("flush-%s-%d-", d.Kind, time.Now().UnixNano())
		for i := 0; i < m; i++ {
			_, err := async.Schedule(d.DB, writeEffect, async.Args(fmt.Sprintf("%s%d", prefix, i), i))
			require.NoError(t, err)
		}
		var wg sync.WaitGroup
		var total atomic.Int64
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					// Break every partition lock so that the runs overlap:
					// only the claims keep them apart.
					d.DB.Exec("DELETE FROM async_lock")
					n, err := async.FlushQueue(d.DB, async.FlushOptions{Jobs: 3})
					if errors.Is(err, async.ErrPartitionBusy) {
						continue
					}
					if !assert.NoError(t, err) {
						return
					}
					total.Add(int64(n))
					if n == 0 {
						return
					}
				}
			}()
		}
		wg.Wait()
		assert.EqualValues(t, m, total.Load())
		assert.EqualValues(t, m, count(t, d.DB, "effects", "k LIKE ?", prefix+"%"))
		assert.EqualValues(t, m, count(t, d.DB, "async_job", "executed IS NOT NULL"))
		for i := 0; i < m; i++ {
			assert.EqualValues(t, 1, runCount(fmt.Sprintf("%s%d", prefix, i)), "job %d ran more than once", i)
		}
	})
}

// Semantic 7: time comes from db.NowFunc, in UTC, with sub-second precision.
func TestTimesFromNowFuncInUTCWithMicroseconds(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		d.Clock.Advance(37 * 24 * time.Hour) // a clock the database does not share
		job, err := async.Schedule(d.DB, writeEffect, async.Args("time", 1))
		require.NoError(t, err)
		got := getJob(t, d.DB, job.ID)
		assert.Equal(t, time.UTC, got.Added.Location())
		assert.True(t, got.Added.Equal(job.Added), "stored %v, scheduled %v", got.Added, job.Added)
		assert.WithinDuration(t, d.Clock.Now(), got.Added, time.Minute)
		assert.NotZero(t, got.Added.Nanosecond()%int(time.Second), "sub-second precision is kept")
		// Microsecond round trip of a run_after time.
		at := time.Date(2031, 5, 6, 7, 8, 9, 123456000, time.FixedZone("X", 3*3600))
		job, err = async.Schedule(d.DB, writeEffect, async.Args("time2", 1), async.RunAfter(at))
		require.NoError(t, err)
		got = getJob(t, d.DB, job.ID)
		require.NotNil(t, got.Scheduled)
		assert.True(t, got.Scheduled.Equal(at), "stored %v want %v", got.Scheduled, at)
		assert.Equal(t, time.UTC, got.Scheduled.Location())
	})
}

// Semantic 8 and the argument checks: bad input writes nothing.
func TestScheduleRejectsBadInput(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		_, err := async.Schedule(nil, writeEffect)
		assert.ErrorIs(t, err, async.ErrNilDB)
		_, err = async.Schedule(d.DB, nil)
		assert.ErrorIs(t, err, async.ErrNilTask)
		_, err = async.Schedule(d.DB, strings.Repeat("x", 192))
		assert.ErrorIs(t, err, async.ErrUnknownTask)
		assert.ErrorContains(t, err, "longer than 191 bytes")
		_, err = async.Schedule(d.DB, writeEffect, async.Args("k", make(chan int)))
		assert.ErrorIs(t, err, async.ErrBadArguments)
		assert.ErrorContains(t, err, "argument 2")
		_, err = async.Schedule(d.DB, writeEffect, async.Args("k"))
		assert.ErrorIs(t, err, async.ErrBadArguments)
		assert.ErrorContains(t, err, "takes 2 argument(s), got 1")
		_, err = async.Schedule(d.DB, writeEffect, async.Args("k", "seven"))
		assert.ErrorIs(t, err, async.ErrBadArguments)
		assert.ErrorContains(t, err, "int")
		_, err = async.Schedule(d.DB, writeEffect, async.Args("k", 1), async.WithKwargs(async.Kwargs{"x": 1}))
		assert.ErrorIs(t, err, async.ErrBadArguments)
		_, err = async.Schedule(d.DB, func(context.Context, *gorm.DB) error { return nil })
		assert.ErrorIs(t, err, async.ErrUnknownTask)
		_, err = async.Schedule(d.DB, 42)
		assert.ErrorIs(t, err, async.ErrBadArguments)
		_, err = async.Schedule(d.DB, "some.task", async.Meta(map[string]any{"f": func() {}}))
		assert.ErrorIs(t, err, async.ErrBadArguments)
		// The columns' sizes: a queue name of 1 to 100 bytes, a group
		// reference of 1 to 191.
		_, err = async.Schedule(d.DB, "some.task", async.Queue(strings.Repeat("q", 101)))
		assert.ErrorIs(t, err, async.ErrBadOption)
		_, err = async.Schedule(d.DB, "some.task", async.InGroup(strings.Repeat("g", 192)))
		assert.ErrorIs(t, err, async.ErrBadOption)
		assert.Zero(t, count(t, d.DB, "async_job", ""))
		assert.Zero(t, count(t, d.DB, "async_group", ""))
		long, err := async.Schedule(d.DB, "some.task", async.Queue(strings.Repeat("q", 100)), async.InGroup(strings.Repeat("g", 191)))
		require.NoError(t, err)
		got := getJob(t, d.DB, long.ID)
		assert.Equal(t, strings.Repeat("q", 100), got.Queue)
		require.NoError(t, d.DB.Delete(&async.Job{}, long.ID).Error)

		// A bad Schedule inside a transaction leaves earlier work intact.
		require.NoError(t, d.DB.Transaction(func(tx *gorm.DB) error {
			_, err := async.Schedule(tx, writeEffect, async.Args("good", 1))
			require.NoError(t, err)
			_, err = async.Schedule(tx, writeEffect, async.Args("bad"))
			require.Error(t, err)
			return nil
		}))
		assert.EqualValues(t, 1, count(t, d.DB, "async_job", ""))
	})
}

func TestRegisterRejectsBadSignatures(t *testing.T) {
	for _, fn := range []any{
		nil, 42, func() error { return nil },
		func(context.Context) error { return nil },
		func(context.Context, *gorm.DB) {},
		func(context.Context, *gorm.DB) (int, int) { return 0, 0 },
		func(context.Context, *gorm.DB, async.Kwargs, int) error { return nil },
		func(context.Context, *gorm.DB, chan int) error { return nil },
		func(context.Context, *gorm.DB, ...int) error { return nil },
	} {
		_, err := async.Register(fn)
		assert.ErrorIs(t, err, async.ErrBadSignature, "%T", fn)
	}
	name, err := async.Register(writeEffect)
	require.NoError(t, err)
	assert.True(t, strings.HasSuffix(name, "async_test.writeEffect"), name)
	// A name must fit the job's name column: 1 to 191 bytes.
	long := func(context.Context, *gorm.DB) error { return nil }
	assert.ErrorIs(t, async.RegisterAs(strings.Repeat("n", 192), long), async.ErrBadSignature)
	assert.ErrorIs(t, async.RegisterAs("", long), async.ErrBadSignature)
	assert.NoError(t, async.RegisterAs(strings.Repeat("n", 191), long))
}

func TestPluginFindsHandlesAndRejectsUnknownDialect(t *testing.T) {
	d := newTestDB(t, "sqlite", nil)
	info, err := async.Dialect(d.DB.Session(&gorm.Session{}).WithContext(context.Background()))
	require.NoError(t, err)
	assert.Equal(t, "sqlite", info.Name)
	require.NoError(t, d.DB.Transaction(func(tx *gorm.DB) error {
		_, err := async.Dialect(tx)
		return err
	}))
	_, err = async.Schedule(&gorm.DB{Config: &gorm.Config{}}, "x")
	assert.ErrorIs(t, err, async.ErrNotInstalled)
}

func TestUnsupportedDialectIsAnError(t *testing.T) {
	db, err := gorm.Open(tests.DummyDialector{}, &gorm.Config{})
	require.NoError(t, err)
	err = db.Use(&async.Plugin{})
	require.ErrorIs(t, err, async.ErrUnsupportedDialect)
	assert.ErrorContains(t, err, `"dummy"`)
}

// A handle that already carries an error (a statement of the caller's
// transaction failed) schedules, deschedules and sets a final job for
// nothing: the call returns that error and writes nothing.
func TestHandleCarryingAnErrorWritesNothing(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		key := newKey(t, "pending")
		pending := scheduleCtl(t, d.DB, key)
		earlier := errors.New("an earlier statement failed")
		broken := func() *gorm.DB {
			h := d.DB.Session(&gorm.Session{})
			_ = h.AddError(earlier)
			return h
		}
		_, err := async.Schedule(broken(), writeEffect, async.Args("k", 1))
		assert.ErrorIs(t, err, earlier)
		_, err = async.ScheduleMany(broken(), async.Task(writeEffect, async.Args("k", 2)))
		assert.ErrorIs(t, err, earlier)
		_, err = async.OnCompletion(broken(), "g", writeEffect, async.Args("k", 3))
		assert.ErrorIs(t, err, earlier)
		n, err := async.Deschedule(broken(), ctlTask, async.Args(key))
		assert.ErrorIs(t, err, earlier)
		assert.Zero(t, n)
		assert.EqualValues(t, 1, count(t, d.DB, "async_job", ""), "nothing scheduled")
		assert.Zero(t, count(t, d.DB, "async_group", ""), "no group")
		assert.True(t, getJob(t, d.DB, pending.ID).Pending(), "nothing cancelled")
	})
}
