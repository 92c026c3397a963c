package async_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Shared helpers of the worker tests (issue 3).

// ctlTask writes an Effect keyed by key in the job's transaction, then does
// whatever the test registered for that key with on(): block, fail, signal.
// A second committed run of the same job would violate the unique key.
func ctlTask(ctx context.Context, tx *gorm.DB, key string) error {
	n := incRun(key)
	if err := tx.Create(&Effect{K: key}).Error; err != nil {
		return err
	}
	if b, ok := behaviours.Load(key); ok {
		return b.(behaviour)(ctx, n)
	}
	return nil
}

// behaviour is what ctlTask does after its write, given the run number (1 for
// the first run of the job in this process).
type behaviour func(ctx context.Context, run int64) error

var behaviours sync.Map // key -> behaviour

func init() { async.MustRegister(ctlTask) }

// on registers what ctlTask does for key until the test ends.
func on(t testing.TB, key string, b behaviour) {
	behaviours.Store(key, b)
	t.Cleanup(func() { behaviours.Delete(key) })
}

func incRun(key string) int64 {
	v, _ := runs.LoadOrStore(key, new(atomic.Int64))
	return v.(*atomic.Int64).Add(1)
}

var keySeq atomic.Int64

// newKey is a process-wide unique job key for this test.
func newKey(t testing.TB, what string) string {
	return fmt.Sprintf("%s/%s/%d", t.Name(), what, keySeq.Add(1))
}

// blockUntil returns a behaviour that signals started on every run, then
// waits for release (returning nil) or for its context (returning its error).
func blockUntil(started chan<- int64, release <-chan struct{}) behaviour {
	return func(ctx context.Context, run int64) error {
		started <- run
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// recv waits for a value on ch, failing the test after the timeout.
func recv[T any](t testing.TB, ch <-chan T, timeout time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(timeout):
		t.Fatalf("timed out after %s waiting for %s", timeout, what)
	}
	var zero T
	return zero
}

// scheduleCtl schedules ctlTask(key) with the given options.
func scheduleCtl(t testing.TB, db *gorm.DB, key string, opts ...async.Option) *async.Job {
	t.Helper()
	job, err := async.Schedule(db, ctlTask, append([]async.Option{async.Args(key)}, opts...)...)
	require.NoError(t, err)
	return job
}

// effects counts the committed effects of a key.
func effects(t testing.TB, db *gorm.DB, key string) int64 {
	t.Helper()
	return count(t, db, "effects", "k = ?", key)
}

// secondHandle opens another *gorm.DB on dsn with its own plugin instance
// (as another process would): it shares the test clock but not the
// in-process writer lock nor the in-process wake-ups of d.DB.
func secondHandle(t testing.TB, d *testDB, dsn string, plugin *async.Plugin) *gorm.DB {
	t.Helper()
	db := openDB(t, d.Kind, dsn, d.Clock)
	if plugin == nil {
		plugin = &async.Plugin{}
	}
	plugin.SkipMigration = true
	if plugin.Logger == nil {
		plugin.Logger = testLogger()
	}
	require.NoError(t, db.Use(plugin))
	return db
}

// logCapture is a slog.Handler that keeps every message, so tests can wait
// for the worker to report something.
type logCapture struct {
	mu     sync.Mutex
	msgs   []string
	next   slog.Handler
	notify chan struct{}
}

func newLogCapture() *logCapture {
	return &logCapture{next: testLogger().Handler(), notify: make(chan struct{}, 1)}
}

func (c *logCapture) Enabled(context.Context, slog.Level) bool { return true }
func (c *logCapture) WithAttrs([]slog.Attr) slog.Handler       { return c }
func (c *logCapture) WithGroup(string) slog.Handler            { return c }

func (c *logCapture) Handle(ctx context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool { fmt.Fprintf(&b, " %s=%v", a.Key, a.Value); return true })
	c.mu.Lock()
	c.msgs = append(c.msgs, b.String())
	c.mu.Unlock()
	select {
	case c.notify <- struct{}{}:
	default:
	}
	if c.next.Enabled(ctx, r.Level) {
		return c.next.Handle(ctx, r)
	}
	return nil
}

// count returns how many messages contain s.
func (c *logCapture) count(s string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, m := range c.msgs {
		if strings.Contains(m, s) {
			n++
		}
	}
	return n
}

// attr returns the value of attribute key in each message containing s.
func (c *logCapture) attr(s, key string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var vals []string
	for _, m := range c.msgs {
		if !strings.Contains(m, s) {
			continue
		}
		for _, f := range strings.Fields(m) {
			if v, ok := strings.CutPrefix(f, key+"="); ok {
				vals = append(vals, v)
			}
		}
	}
	return vals
}

// waitLog waits until at least n messages contain s.
func (c *logCapture) waitLog(t testing.TB, s string, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for c.count(s) < n {
		select {
		case <-c.notify:
		case <-deadline:
			t.Fatalf("timed out after %s waiting for %d log message(s) containing %q; got %d", timeout, n, s, c.count(s))
		}
	}
}

func (c *logCapture) logger() *slog.Logger { return slog.New(c) }

// waitJob polls a job until cond holds.
func waitJob(t *testing.T, db *gorm.DB, id int64, timeout time.Duration, what string, cond func(*async.Job) bool) *async.Job {
	t.Helper()
	var j *async.Job
	waitFor(t, timeout, fmt.Sprintf("job %d: %s", id, what), func() bool {
		j = getJob(t, db, id)
		return cond(j)
	})
	return j
}

func executed(j *async.Job) bool { return j.Executed != nil }
