package async_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

type traceKey struct{}

// afterSeen is what an AfterRun hook observed.
type afterSeen struct {
	info     async.RunInfo
	stored   async.Job // the job read from another connection in the hook
	readErr  error
	schedErr error // scheduling a job from the hook
}

// Plugin.BeforeRun runs inside the job's transaction (its writes commit or
// roll back with the task's) and its context is the task's; Plugin.AfterRun
// gets the job, outcome, error and duration once the transaction is over.
func TestWorkerRunHooks(t *testing.T) {
	for _, kind := range dbKinds {
		t.Run(kind, func(t *testing.T) {
			seen := make(chan afterSeen, 10)
			var d *testDB
			d = newTestDB(t, kind, &async.Plugin{
				BeforeRun: func(ctx context.Context, tx *gorm.DB, job *async.Job) context.Context {
					if err := tx.Create(&Effect{K: fmt.Sprintf("hook-%d", job.ID)}).Error; err != nil {
						panic(err)
					}
					return context.WithValue(ctx, traceKey{}, fmt.Sprintf("trace-%d", job.ID))
				},
				AfterRun: func(ctx context.Context, info async.RunInfo) {
					s := afterSeen{info: info}
					// Outside the transaction: another connection sees the
					// outcome, and a write does not wait for the job's lock.
					s.readErr = d.DB.WithContext(ctx).Where("id = ?", info.Job.ID).Take(&s.stored).Error
					_, s.schedErr = async.Schedule(d.DB.WithContext(ctx), ctlTask, async.Args(newKey(t, "follow-up")), async.Queue("follow-up"))
					seen <- s
				},
			})
			migrateApp(t, d)
			traces := make(chan string, 10)
			task := func(err error) string {
				key := newKey(t, "job")
				on(t, key, func(ctx context.Context, run int64) error {
					trace, _ := ctx.Value(traceKey{}).(string)
					traces <- trace
					return err
				})
				return key
			}
			okKey, retryKey, failKey := task(nil), task(errors.New("try again")), task(async.Permanent(errors.New("give up")))
			ok := scheduleCtl(t, d.DB, okKey, async.Priority(3))
			retry := scheduleCtl(t, d.DB, retryKey, async.Priority(2))
			failed := scheduleCtl(t, d.DB, failKey, async.Priority(1))
			startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, PollInterval: 20 * time.Millisecond})

			for _, want := range []struct {
				job     *async.Job
				outcome async.Outcome
				errText string
			}{{ok, async.OutcomeExecuted, ""}, {retry, async.OutcomeRetry, "try again"}, {failed, async.OutcomeFailed, "give up"}} {
				s := recv(t, seen, time.Minute, "AfterRun")
				require.Equal(t, want.job.ID, s.info.Job.ID, "runs in priority order")
				assert.Equal(t, fmt.Sprintf("trace-%d", want.job.ID), recv(t, traces, time.Second, "the task's trace"),
					"the task got BeforeRun's context")
				assert.Equal(t, want.outcome, s.info.Outcome)
				if want.errText == "" {
					assert.NoError(t, s.info.Err)
				} else {
					assert.ErrorContains(t, s.info.Err, want.errText)
				}
				assert.Positive(t, s.info.Duration)
				assert.False(t, s.info.Started.IsZero())
				assert.Equal(t, 1, s.info.Job.Attempts)
				require.NoError(t, s.readErr)
				assert.Empty(t, s.stored.LockedBy, "the run's outcome is committed when AfterRun is called")
				require.NoError(t, s.schedErr, "AfterRun can write: it holds no transaction")
				hookWrites := effects(t, d.DB, fmt.Sprintf("hook-%d", want.job.ID))
				switch want.outcome {
				case async.OutcomeExecuted:
					assert.NotNil(t, s.stored.Executed)
					assert.EqualValues(t, 1, hookWrites, "BeforeRun's write commits with the job")
				case async.OutcomeRetry:
					assert.NotNil(t, s.stored.Scheduled)
					assert.Zero(t, hookWrites, "BeforeRun's write rolls back with the task's")
				case async.OutcomeFailed:
					assert.NotNil(t, s.stored.Failed)
					assert.Zero(t, hookWrites)
				}
			}
			assert.EqualValues(t, 3, count(t, d.DB, "async_job", "queue = ?", "follow-up"))
		})
	}
}

// handleSeen is what a task saw of its handle's context.
type handleSeen struct {
	trace       any
	hasDeadline bool
}

var handleProbes sync.Map // key -> chan handleSeen

// probeHandle reports what its handle's context carries.
func probeHandle(ctx context.Context, tx *gorm.DB, key string) error {
	c := tx.Statement.Context
	_, dl := c.Deadline()
	if ch, ok := handleProbes.Load(key); ok {
		ch.(chan handleSeen) <- handleSeen{trace: c.Value(traceKey{}), hasDeadline: dl}
	}
	return nil
}

func init() { async.MustRegister(probeHandle) }

// A task's *gorm.DB carries the task's context (the job timeout's deadline,
// BeforeRun's values), in strict mode and with group commit, so that its
// statements are cancelled with the job and GORM plugins (tracing) see it.
func TestTaskHandleCarriesTheTaskContext(t *testing.T) {
	for _, kind := range dbKinds {
		t.Run(kind, func(t *testing.T) {
			for _, hook := range []bool{false, true} {
				plugin := &async.Plugin{}
				if hook {
					plugin.BeforeRun = func(ctx context.Context, tx *gorm.DB, job *async.Job) context.Context {
						return context.WithValue(ctx, traceKey{}, fmt.Sprintf("trace-%d", job.ID))
					}
				}
				d := newTestDB(t, kind, plugin)
				for _, batch := range []int{1, 4} {
					key := newKey(t, "probe")
					ch := make(chan handleSeen, 4)
					handleProbes.Store(key, ch)
					t.Cleanup(func() { handleProbes.Delete(key) })
					for range 3 {
						_, err := async.Schedule(d.DB, probeHandle, async.Args(key))
						require.NoError(t, err)
					}
					stop := startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, BatchSize: batch, JobTimeout: time.Minute, PollInterval: 20 * time.Millisecond})
					for range 3 {
						s := recv(t, ch, time.Minute, "a task's report")
						assert.True(t, s.hasDeadline, "BatchSize %d, BeforeRun %v: the job timeout's deadline", batch, hook)
						if hook {
							assert.Contains(t, s.trace, "trace-", "BatchSize %d: BeforeRun's value", batch)
						} else {
							assert.Nil(t, s.trace)
						}
					}
					stop()
				}
			}
		})
	}
}

// NewWorker fills in the documented defaults, returned by Options, and
// rejects a concurrency the connection pool cannot serve.
func TestNewWorkerOptions(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		sqlDB, err := d.DB.DB()
		require.NoError(t, err)
		defer sqlDB.SetMaxOpenConns(20)
		reserved := 1 // claims and bookkeeping
		if d.Kind == "postgres" {
			reserved++ // the LISTEN connection
		}

		w, err := async.NewWorker(d.DB, async.WorkerOptions{})
		require.NoError(t, err)
		o := w.Options()
		assert.Equal(t, async.DefaultConcurrency, o.Concurrency, "the test pool has 20 connections")
		assert.Equal(t, []string{async.DefaultQueue}, o.Queues)
		assert.Equal(t, time.Second, o.PollInterval)
		assert.Zero(t, o.JobTimeout)
		assert.Equal(t, 30*time.Second, o.ShutdownTimeout)
		assert.Equal(t, async.DefaultLease, o.Lease)
		assert.Equal(t, 1, o.BatchSize, "strict mode by default")
		assert.Equal(t, 50*time.Millisecond, o.BatchWindow)
		assert.Equal(t, 16*async.DefaultConcurrency, o.Prefetch, "Prefetch defaults to 16 x Concurrency")
		host, _ := os.Hostname()
		assert.True(t, strings.HasPrefix(o.ID, fmt.Sprintf("%s-%d-", host, os.Getpid())), o.ID)
		assert.LessOrEqual(t, len(o.ID), 64)

		set := async.WorkerOptions{Concurrency: 3, Queues: []string{"a", "b"}, PollInterval: time.Minute, JobTimeout: time.Second,
			ShutdownTimeout: time.Second, Lease: 5 * time.Second, BatchSize: 4, BatchWindow: time.Second, Prefetch: 7, ID: "w1"}
		w, err = async.NewWorker(d.DB, set)
		require.NoError(t, err)
		assert.Equal(t, set, w.Options())

		sqlDB.SetMaxOpenConns(5)
		w, err = async.NewWorker(d.DB, async.WorkerOptions{})
		require.NoError(t, err)
		assert.Equal(t, 5-reserved, w.Options().Concurrency, "the default is lowered to fit the pool")
		assert.Equal(t, 128, w.Options().Prefetch, "Prefetch is at least 128")
		w, err = async.NewWorker(d.DB, async.WorkerOptions{Concurrency: 1, Prefetch: -5})
		require.NoError(t, err)
		assert.Equal(t, -1, w.Options().Prefetch, "a negative Prefetch turns it off")
		w, err = async.NewWorker(d.DB, async.WorkerOptions{Concurrency: 1, BatchSize: 8})
		require.NoError(t, err)
		assert.Equal(t, -1, w.Options().Prefetch, "no Prefetch by default with group commit")
		_, err = async.NewWorker(d.DB, async.WorkerOptions{Concurrency: 5 - reserved})
		require.NoError(t, err)
		_, err = async.NewWorker(d.DB, async.WorkerOptions{Concurrency: 5 - reserved + 1})
		require.ErrorIs(t, err, async.ErrPoolTooSmall)
		assert.ErrorContains(t, err, "SetMaxOpenConns")
		sqlDB.SetMaxOpenConns(reserved)
		_, err = async.NewWorker(d.DB, async.WorkerOptions{})
		require.ErrorIs(t, err, async.ErrPoolTooSmall, "no connection left for jobs")
		sqlDB.SetMaxOpenConns(0) // unlimited
		w, err = async.NewWorker(d.DB, async.WorkerOptions{Concurrency: 100})
		require.NoError(t, err)
		assert.Equal(t, 100, w.Options().Concurrency)

		for _, bad := range []async.WorkerOptions{{Concurrency: -1}, {PollInterval: -1}, {JobTimeout: -1},
			{ShutdownTimeout: -1}, {Lease: -1}, {BatchSize: -1}, {BatchWindow: -1}, {ID: strings.Repeat("x", 65)}} {
			_, err = async.NewWorker(d.DB, bad)
			assert.ErrorIs(t, err, async.ErrBadOption, "%+v", bad)
		}
		_, err = async.NewWorker(nil, async.WorkerOptions{})
		assert.ErrorIs(t, err, async.ErrNilDB)
		_, err = async.NewWorker(&gorm.DB{Config: &gorm.Config{}}, async.WorkerOptions{})
		assert.ErrorIs(t, err, async.ErrNotInstalled)
	})
}
