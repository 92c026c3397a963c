package async

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"gorm.io/gorm"
)

const pluginName = "async"

// DefaultMaxAttempts is the number of runs a job gets when neither the job
// (MaxAttempts option) nor the plugin says otherwise.
const DefaultMaxAttempts = 25

// Plugin is the GORM plugin that installs the job queue:
//
//	db.Use(&async.Plugin{})
//
// Install it right after gorm.Open, before deriving sessions from db.
type Plugin struct {
	// SkipMigration leaves the tables alone; by default Initialize makes
	// what async_job, async_error, async_group and async_lock lack (and
	// nothing else: see the README's Databases section).
	SkipMigration bool
	// MaxAttempts is the default number of runs a job gets before it ends
	// failed. Zero means DefaultMaxAttempts; a negative value means unlimited.
	MaxAttempts int
	// RetryPolicy decides when and at what priority a failed job runs again.
	// Nil means DefaultRetryPolicy (the reference's 60·n^1.6 seconds, priority
	// lowered by one). A task's own policy (WithRetryPolicy) wins over this one.
	RetryPolicy RetryPolicy
	// Logger receives the plugin's logs. Nil means slog.Default().
	Logger *slog.Logger
	// BeforeRun, if set, is called inside each job's transaction just before
	// its task; the context it returns is the task's context.
	BeforeRun BeforeRunHook
	// AfterRun, if set, is called after each run ends, outside any transaction.
	AfterRun AfterRunHook
	// JobLink turns a job id into the link reported by Health (for example a
	// URL of an admin page). Nil reports the bare id.
	JobLink func(id int64) string

	db      *gorm.DB
	sqlDB   *sql.DB // the pool under db, when it is a plain *sql.DB
	stmts   stmtCache
	dialect *dialect
	wakers  notifier
	hints   claimHints // where claims' reads start (claim_hint.go)
	// released counts the jobs this process gave back unstarted (tests).
	released atomic.Int64
	// writer serialises this process's writing transactions on SQLite,
	// which has a single database-wide writer: a token, held while sent.
	writer chan struct{}
}

// Name returns "async", the plugin's name in gorm.Config.Plugins.
func (p *Plugin) Name() string { return pluginName }

// Initialize detects the dialect, migrates the tables and installs the
// callbacks. GORM calls it from db.Use.
func (p *Plugin) Initialize(db *gorm.DB) error {
	d, err := detectDialect(db)
	if err != nil {
		return err
	}
	p.db, p.dialect = db, d
	p.writer = make(chan struct{}, 1)
	if p.Logger == nil {
		p.Logger = slog.Default()
	}
	if !p.SkipMigration {
		if err := p.migrate(db); err != nil {
			return err
		}
	}
	if off, err := p.clockOffset(db); err == nil && math.Abs(off) > clockWarnSeconds {
		p.Logger.Warn("async: this process's clock (db.NowFunc) differs from the database's; leases and schedules compare times every process writes from its own clock, so they must agree to well within the lease",
			"offset_seconds", off)
	}
	if !d.skipLocked && !d.singleWriter {
		p.Logger.Warn("async: database server lacks FOR UPDATE SKIP LOCKED; workers fall back to plain row locking", "version", d.version)
	}
	p.sqlDB = installCommitWake(db, p)
	if why := d.useConnTxns(db, p.sqlDB); why != "" {
		p.Logger.Info("async: MariaDB compound statements unavailable; runs and claims take more round trips", "reason", why)
	}
	registerBuiltins()
	return db.Callback().Create().After("gorm:create").Register("async:wake_on_job_insert", p.afterCreate)
}

// Dialect describes the database the plugin detected on db.
func Dialect(db *gorm.DB) (DialectInfo, error) {
	p, err := pluginOf(db)
	if err != nil {
		return DialectInfo{}, err
	}
	return p.dialect.info(), nil
}

// pluginOf finds the plugin installed on db's configuration.
func pluginOf(db *gorm.DB) (*Plugin, error) {
	if db == nil {
		return nil, ErrNilDB
	}
	if db.Config != nil {
		if p, ok := db.Config.Plugins[pluginName].(*Plugin); ok && p.dialect != nil {
			return p, nil
		}
	}
	return nil, ErrNotInstalled
}

// now is the database clock: db.NowFunc in UTC, at the microsecond precision
// all three databases store.
func (p *Plugin) now() time.Time {
	return p.db.Config.NowFunc().UTC().Truncate(time.Microsecond)
}

func (p *Plugin) maxAttempts() int {
	switch {
	case p.MaxAttempts == 0:
		return DefaultMaxAttempts
	case p.MaxAttempts < 0:
		return 0
	}
	return p.MaxAttempts
}

// ctxOf is db's context, or the background one where it has none.
func ctxOf(db *gorm.DB) context.Context {
	if ctx := db.Statement.Context; ctx != nil {
		return ctx
	}
	return context.Background()
}

// clockWarnSeconds is the difference between this process's clock and the
// database's past which Initialize warns.
const clockWarnSeconds = 5

// clockOffset measures the database's clock minus this process's
// (db.NowFunc), in seconds to the millisecond, against the middle of the
// round trip.
func (p *Plugin) clockOffset(db *gorm.DB) (float64, error) {
	var server float64
	before := p.now()
	if err := db.Session(&gorm.Session{NewDB: true}).Raw(p.dialect.epochSQL()).Row().Scan(&server); err != nil {
		return 0, err
	}
	after := p.now()
	mid := before.Add(after.Sub(before) / 2)
	return math.Round((server-float64(mid.UnixMicro())/1e6)*1e3) / 1e3, nil // to the millisecond
}

// hardStopKey is the context key under which Worker.Run and FlushQueue pass
// their runs the context that ends their bookkeeping (hardStop.ctx).
type hardStopKey struct{}

// detach is ctx's values without its cancellation, for the bookkeeping that
// must outlive a cancelled run (rollbacks, releases, failure records,
// AfterRun): it ends only with the hard stop Worker.Run put in ctx, if any,
// so that a database that stopped answering cannot hold Run for ever.
func detach(ctx context.Context) context.Context {
	d := context.WithoutCancel(ctx)
	if h, ok := ctx.Value(hardStopKey{}).(context.Context); ok {
		return hardStopped{Context: d, stop: h}
	}
	return d
}

// hardStop ends the bookkeeping of the runs whose context carries it
// (detach), a while after it is armed.
type hardStop struct {
	ctx   context.Context // what detach takes its cancellation from
	end   context.CancelFunc
	mu    sync.Mutex
	timer *time.Timer // once armed
}

func newHardStop() *hardStop {
	ctx, end := context.WithCancel(context.Background())
	return &hardStop{ctx: ctx, end: end}
}

// carriedBy is ctx carrying h, for detach to find.
func (h *hardStop) carriedBy(ctx context.Context) context.Context {
	return context.WithValue(ctx, hardStopKey{}, h.ctx)
}

// arm ends the bookkeeping after d.
func (h *hardStop) arm(d time.Duration) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.timer = time.AfterFunc(d, h.end)
}

// release stops h's timer and ends its context, once nothing uses it.
func (h *hardStop) release() {
	h.mu.Lock()
	if h.timer != nil {
		h.timer.Stop()
	}
	h.mu.Unlock()
	h.end()
}

// withHardStop is ctx carrying a hard stop for the bookkeeping of its runs
// (detach), which comes after the given time once ctx has ended; end, once
// nothing uses the context any more, releases it.
func withHardStop(ctx context.Context, after time.Duration) (_ context.Context, end func()) {
	h := newHardStop()
	stop := context.AfterFunc(ctx, func() { h.arm(after) })
	return h.carriedBy(ctx), func() {
		stop()
		h.release()
	}
}

// hardStopped has the values of its Context and the cancellation of stop.
type hardStopped struct {
	context.Context
	stop context.Context
}

func (c hardStopped) Deadline() (time.Time, bool) { return c.stop.Deadline() }
func (c hardStopped) Done() <-chan struct{}       { return c.stop.Done() }
func (c hardStopped) Err() error                  { return c.stop.Err() }

// AfterFunc lets context.AfterFunc and the contexts derived from c register
// with stop instead of starting a goroutine each.
func (c hardStopped) AfterFunc(f func()) func() bool { return context.AfterFunc(c.stop, f) }

// session is a fresh handle on the root db with ctx.
func (p *Plugin) session(ctx context.Context) *gorm.DB {
	return p.db.Session(&gorm.Session{NewDB: true, Context: ctx})
}

// serialize runs fn holding the in-process writer lock where the database
// has a single writer, waiting for it as long as it takes: the worker's and
// FlushQueue's own steps, whose holders end.
func (p *Plugin) serialize(fn func() error) error {
	if p.dialect.singleWriter {
		p.writer <- struct{}{}
		defer func() { <-p.writer }()
	}
	return fn()
}

// serializeEntry is serialize for the first step of an entry point an
// application (or a task) calls: Retry, Deschedule, FlushQueue,
// Job.Execute. It waits for the writer lock at most the dialect's busyWait,
// or until ctx ends, and then fails with ErrWriterBusy, as SQLite fails a
// writer after its busy_timeout. A task that calls one of them through a
// handle other than its own would otherwise wait for its own run, which
// holds the lock, for ever.
func (p *Plugin) serializeEntry(ctx context.Context, what string, fn func() error) error {
	if !p.dialect.singleWriter {
		return fn()
	}
	select {
	case p.writer <- struct{}{}:
	default:
		t := time.NewTimer(p.dialect.busyWait)
		defer t.Stop()
		select {
		case p.writer <- struct{}{}:
		case <-ctx.Done():
			return fmt.Errorf("async: %s: waiting for this process's SQLite writer: %w", what, context.Cause(ctx))
		case <-t.C:
			return errorf(ErrWriterBusy, "%s: this process's SQLite writer stayed busy for %s (a running job holds it; a task must write through the *gorm.DB it is given)",
				what, p.dialect.busyWait)
		}
	}
	defer func() { <-p.writer }()
	return fn()
}

// writerWait is how long serializeEntry waits, given SQLite's busy_timeout:
// as long, and at least 5s.
func writerWait(busyTimeout time.Duration) time.Duration {
	return max(busyTimeout, 5*time.Second)
}

// notifier wakes idle workers of this process.
type notifier struct {
	mu   sync.Mutex
	subs map[chan struct{}]struct{}
}

func (n *notifier) subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	n.mu.Lock()
	if n.subs == nil {
		n.subs = map[chan struct{}]struct{}{}
	}
	n.subs[ch] = struct{}{}
	n.mu.Unlock()
	return ch, func() {
		n.mu.Lock()
		delete(n.subs, ch)
		n.mu.Unlock()
	}
}

func (n *notifier) broadcast() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for ch := range n.subs {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}
