package async

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"gorm.io/gorm"
)

// Test hooks, compiled only into this package's tests.

// InsertMethods names the bulk insert methods ScheduleManyWith can force.
var InsertMethods = map[string]insertMethod{
	"unnest":    insertUnnest,
	"returning": insertValuesReturning,
	"lastid":    insertValuesLastID,
}

// ScheduleManyWith is ScheduleMany with the bulk insert method forced, so
// that tests reach every method on the servers they have.
func ScheduleManyWith(method string, tx *gorm.DB, calls ...Call) ([]*Job, error) {
	m, ok := InsertMethods[method]
	if !ok {
		return nil, fmt.Errorf("async: unknown insert method %q", method)
	}
	return scheduleMany(tx, calls, m)
}

// ClaimForTest claims up to limit due jobs of the given queues (all when
// none) for owner, as a worker does, with a lease of a day, and returns
// them in run order.
func ClaimForTest(db *gorm.DB, owner string, limit int, queues ...string) ([]*Job, error) {
	p, err := pluginOf(db)
	if err != nil {
		return nil, err
	}
	return p.claim(context.Background(), &claimFilter{queues: queues, limit: limit, lease: 24 * time.Hour, owner: owner})
}

// ClaimLeaseForTest is ClaimForTest with a lease of the given length.
func ClaimLeaseForTest(db *gorm.DB, owner string, limit int, lease time.Duration) ([]*Job, error) {
	p, err := pluginOf(db)
	if err != nil {
		return nil, err
	}
	return p.claim(context.Background(), &claimFilter{limit: limit, lease: lease, owner: owner})
}

// RunClaimedForTest runs a job claimed by ClaimForTest or ClaimLeaseForTest
// as a worker runs one (strict mode) and returns its run.
func RunClaimedForTest(db *gorm.DB, job *Job) RunInfo {
	p, _ := pluginOf(db)
	return p.runJobs(context.Background(), []*Job{job}, runOptions{})[0]
}

// ClaimStatementsForTest are the statements of a claim of limit jobs of the
// given queues, with their arguments, as of the plugin's current time: on
// Postgres its one SELECT of job ids; elsewhere the probes for the highest
// priority and the ones below and above 5, and the reads of priority 5's
// due scheduled and unscheduled jobs.
func ClaimStatementsForTest(db *gorm.DB, limit int, queues ...string) ([]string, [][]any, error) {
	p, err := pluginOf(db)
	if err != nil {
		return nil, nil, err
	}
	now := p.now()
	f := &claimFilter{queues: queues, limit: limit, lease: time.Minute}
	if p.dialect.kind == kindPostgres {
		q, args := p.claimIDs(f, now)
		return []string{q}, [][]any{args}, nil
	}
	var due []any
	if p.dialect.kind == kindSQLite {
		due = []any{now}
	}
	conds, cargs := p.claimConds(f, now)
	qs := []string{p.priorityProbe(""), p.priorityProbe("<"), p.priorityProbe(">")}
	args := [][]any{due, append(due, 5), append(due, 5)}
	for _, set := range []dueSet{dueScheduled, dueUnscheduled} {
		qs = append(qs, p.claimHalf("j.id", "?", set, conds, "?"))
		args = append(args, append(append([]any{5}, halfArgs(set, now, cargs)...), limit))
	}
	return qs, args, nil
}

// SelectClaimableForTest runs the claim's read of up to limit claimable jobs
// of the given queues in the caller's transaction tx, without leasing them.
func SelectClaimableForTest(tx *gorm.DB, limit int, queues ...string) ([]*Job, error) {
	p, err := pluginOf(tx)
	if err != nil {
		return nil, err
	}
	return p.selectClaimable(p.hotQueryOn(tx), &claimFilter{queues: queues, limit: limit, lease: time.Minute}, p.now())
}

// SetStaleAfter changes how long w's ready jobs wait, with no slot freeing,
// before they go back to the queue.
func SetStaleAfter(w *Worker, d time.Duration) { w.staleAfter = d }

// ChainedRuns counts the runs, in this process, that began in the same
// round trip as the previous run's commit.
func ChainedRuns() int64 { return chainedRuns.Load() }

// SetInlineLimit sets the size past which MariaDB statements take their
// arguments bound instead of written in (n > 0), and returns the undo.
func SetInlineLimit(n int) (restore func()) {
	old := mariaMaxInline
	if n > 0 {
		mariaMaxInline = n
	}
	return func() { mariaMaxInline = old }
}

// SetClaimReadHook makes MySQL claims call f between their reads and their
// UPDATE, their transaction open, and returns the undo.
func SetClaimReadHook(f func()) (restore func()) {
	old := claimReadHook
	claimReadHook = f
	return func() { claimReadHook = old }
}

// SetHintSpan sets how long db's claim hints may keep claims from reading
// below them (negative: hints are not used) and returns the undo.
func SetHintSpan(db *gorm.DB, d time.Duration) (restore func()) {
	p, err := pluginOf(db)
	if err != nil {
		panic(err)
	}
	p.hints.mu.Lock()
	defer p.hints.mu.Unlock()
	old := p.hints.span
	p.hints.span = d
	return func() {
		p.hints.mu.Lock()
		defer p.hints.mu.Unlock()
		p.hints.span = old
	}
}

// ForgetClaimHints drops db's claim hints.
func ForgetClaimHints(db *gorm.DB) {
	p, err := pluginOf(db)
	if err != nil {
		panic(err)
	}
	p.hints.forget()
}

// ClaimReadsForTest runs the reads of a claim of up to limit jobs of the
// given queues in a transaction it rolls back, and returns each statement
// with its arguments written in, times in UTC as the tests' DSN has them
// (MySQL and MariaDB).
func ClaimReadsForTest(db *gorm.DB, limit int, queues ...string) ([]string, error) {
	p, err := pluginOf(db)
	if err != nil {
		return nil, err
	}
	if p.dialect.kind != kindMySQL {
		return nil, fmt.Errorf("async: ClaimReadsForTest is for MySQL")
	}
	m := &mariaTxns{loc: time.UTC}
	var stmts []string
	errDone := fmt.Errorf("done")
	err = p.session(context.Background()).Transaction(func(tx *gorm.DB) error {
		query := p.hotQueryOn(tx)
		_, err := p.selectClaimable(func(q string, args ...any) (*sql.Rows, error) {
			s, err := m.inline(q, args)
			if err != nil {
				return nil, err
			}
			stmts = append(stmts, s)
			return query(q, args...)
		}, &claimFilter{queues: queues, limit: limit, lease: time.Minute}, p.now())
		if err != nil {
			return err
		}
		return errDone
	}, p.dialect.claimTxOptions())
	if err != errDone {
		return nil, err
	}
	return stmts, nil
}

// SetDescheduleWaitHook makes Deschedule call f before each read of the
// rows a claim under way held, and returns the undo.
func SetDescheduleWaitHook(f func()) (restore func()) {
	old := descheduleWaitHook
	descheduleWaitHook = f
	return func() { descheduleWaitHook = old }
}

// SetWorkerClaimHook has f see each claim a worker makes: its limit and the
// batch size it splits into. Not for parallel tests.
func SetWorkerClaimHook(f func(limit, batch int)) (restore func()) {
	old := workerClaimHook
	workerClaimHook = f
	return func() { workerClaimHook = old }
}

// ReleasedForTest is how many jobs db's plugin has given back unstarted.
func ReleasedForTest(db *gorm.DB) int64 {
	p, err := pluginOf(db)
	if err != nil {
		panic(err)
	}
	return p.released.Load()
}

// MariaCommitForTest runs, on a connection of db's pool held as a run's
// transaction is on MariaDB (compound statements), first in a new
// transaction, then commit with q and next, and rolls back whatever is open
// afterwards.
func MariaCommitForTest(db *gorm.DB, first, q, next string) (firstN, nextN int64, execErr, commitErr, beginErr error, err error) {
	p, err := pluginOf(db)
	if err != nil {
		return 0, 0, nil, nil, nil, err
	}
	m, ok := p.dialect.txns.(*mariaTxns)
	if !ok {
		return 0, 0, nil, nil, nil, fmt.Errorf("async: MariaCommitForTest: runs do not use compound statements here")
	}
	ctx := context.Background()
	conn, firstN, err := m.begin(ctx, p.sqlDB, first, nil)
	if err != nil {
		return 0, 0, nil, nil, nil, err
	}
	execErr, commitErr, nextN, beginErr = m.commit(ctx, conn, q, nil, next, nil)
	m.rollback(ctx, conn)
	return firstN, nextN, execErr, commitErr, beginErr, nil
}

// SetWriterWait sets how long db's plugin's entry points wait for its SQLite
// writer (serializeEntry) before failing with ErrWriterBusy.
func SetWriterWait(db *gorm.DB, d time.Duration) {
	p, err := pluginOf(db)
	if err != nil {
		panic(err)
	}
	p.dialect.busyWait = d
}

// AfterBrokenTxForTest records err as the failure of job's run, as after a
// transaction that could not be used (afterBrokenTx): wrote is nil for a
// transaction rolled back, else the start time written by the completion
// of a commit that failed.
func AfterBrokenTxForTest(db *gorm.DB, job *Job, err error, wrote *time.Time) (Outcome, error) {
	p, perr := pluginOf(db)
	if perr != nil {
		return "", perr
	}
	return p.afterBrokenTx(context.Background(), job, lookupTask(job.Name), err, "", wrote)
}

// SetBookkeepingGrace sets how long Worker.Run's shutdown lets bookkeeping
// go on after the shutdown timeout.
func SetBookkeepingGrace(d time.Duration) (restore func()) {
	old := bookkeepingGrace
	bookkeepingGrace = func(time.Duration) time.Duration { return d }
	return func() { bookkeepingGrace = old }
}

// SetFlushBookkeeping sets how long FlushQueue's bookkeeping may go on after
// its context has ended.
func SetFlushBookkeeping(d time.Duration) (restore func()) {
	old := flushBookkeeping
	flushBookkeeping = d
	return func() { flushBookkeeping = old }
}
