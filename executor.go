package async

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"time"

	"gorm.io/gorm"
)

// Execution: each job runs in its own transaction (the reference's
// commit_on_success). The task's writes through tx commit together with the
// job's completion; a failure rolls them back, records the error with its
// stack and reschedules the job (failure.go).

// runOptions tune one run.
type runOptions struct {
	timeout time.Duration // per task; zero: none
	window  time.Duration // group commit: no new job joins a transaction open longer than this
	// stop, once closed, starts no further job: the worker is shutting
	// down, and claimed jobs not yet started (queued behind SQLite's one
	// writer, or later in a batch) are given back at once instead of
	// running in the shutdown grace period. Jobs already running finish.
	stop <-chan struct{}
	// chain, in strict mode on a connTxns connection, lets a run's commit
	// begin the next job's run in the same round trip (runChain).
	chain *runChain
}

// stopping reports whether stop is closed.
func (o runOptions) stopping() bool {
	select {
	case <-o.stop:
		return true
	default:
		return false
	}
}

// stillPending tests a job row found by its id. It is written so that no
// index on the three columns can serve it: on MySQL under REPEATABLE READ an
// UPDATE that chose the pending-jobs index would hold next-key locks on it
// for the whole job, blocking every Schedule.
const stillPending = "COALESCE(executed, cancelled, failed) IS NULL"

// runJobs executes claimed jobs; it is the one way a job runs. With one job
// this is the strict mode: one transaction per job (runTx). With several,
// group commit: they share transactions (runOptimistic, which falls back to
// runTx's savepoint per job when a task fails). ctx is the tasks' context:
// cancelling it interrupts the runs, which are rolled back and released
// without counting the attempt.
func (p *Plugin) runJobs(ctx context.Context, jobs []*Job, o runOptions) []RunInfo {
	infos := make([]RunInfo, len(jobs))
	for i, j := range jobs {
		infos[i].Job = j
	}
	_ = p.serialize(func() error {
		for next := 0; next < len(jobs); {
			if ctx.Err() != nil || o.stopping() {
				o.chain.drop() // its row lock would hold up the release
				p.releaseUnstarted(detach(ctx), jobs[next:])
				break
			}
			if len(jobs)-next > 1 {
				next = p.runOptimistic(ctx, jobs, infos, next, o)
			} else {
				next = p.runTx(ctx, jobs, infos, next, o)
			}
		}
		return nil
	})
	for i := range infos {
		if j := infos[i].Job; j.GroupID != nil && (infos[i].Outcome == OutcomeExecuted || infos[i].Outcome == OutcomeFailed) {
			// The group's final job may be runnable now: idle workers of
			// this process claim at once (others at their next poll).
			p.wakers.broadcast()
			break
		}
	}
	for i := range infos {
		if infos[i].Outcome == "" {
			continue // released unstarted
		}
		p.logRun(infos[i])
		if p.AfterRun != nil {
			p.AfterRun(detach(ctx), infos[i])
		}
	}
	return infos
}

// completeSQL marks a job executed, with the start time its fence saw. The
// job's row is locked by its fence, so the claim needs no re-check.
const completeSQL = "UPDATE " + jobTable + " SET started = ?, executed = ?, result = ?, locked_by = '', locked_until = NULL WHERE id = ?"

// runTx runs jobs[first:] in one transaction, each job in its own savepoint,
// until they are done, the window closes or the context ends, and returns
// the index of the first job it did not take. The transaction begins with
// the first job's fence and commits with the last job's completion (on
// Postgres, one round trip each).
func (p *Plugin) runTx(ctx context.Context, jobs []*Job, infos []RunInfo, first int, o runOptions) int {
	bg := context.WithoutCancel(ctx) // the run's transaction: it must not end with a task's ctx
	setInfo := func(k int, out Outcome, err error) {
		infos[k].Outcome, infos[k].Err = out, err
		infos[k].Duration = time.Since(infos[k].Started)
	}
	var tx *runTxn
	var inTx []int              // jobs whose outcome commits with tx
	var wrote map[int]time.Time // jobs completed in tx but the last: the start their completion wrote
	shared := len(jobs)-first > 1
	// Several jobs in one transaction: what a job's outcome wrote into its
	// *Job (its claim cleared, a new schedule) holds only once tx commits.
	// Until then a rollback must find each job as it was claimed, so that
	// releasing it or recording its failure matches its claim.
	var claimed []Job
	if shared {
		claimed = make([]Job, len(jobs))
	}
	undo := func(idx ...int) {
		if shared {
			for _, i := range idx {
				*jobs[i] = claimed[i]
			}
		}
	}
	// abort rolls the transaction back: job k's failure is recorded apart;
	// the others that ran in it are given back to run again. wrote is
	// afterBrokenTx's: nil unless the commit with job k's completion
	// failed, which may have taken effect all the same.
	var win *window
	abort := func(k int, t *task, err error, stack string, wrote *time.Time) int {
		if tx != nil {
			tx.rollback()
		}
		undo(append(inTx, k)...)
		p.releaseAll(detach(ctx), jobs, inTx, infos, fmt.Errorf("async: shared transaction rolled back: %w", err))
		out, err := p.afterBrokenTx(detach(ctx), jobs[k], t, err, stack, wrote)
		setInfo(k, out, err)
		if win.stop() {
			return len(jobs) // the window released the rest
		}
		return k + 1
	}
	// With group commit, the window bounds the transaction by time; the
	// jobs not started go back to the queue if a slow job holds them
	// (window.go).
	win = p.batchWindow(bg, jobs, first, o.window)
	defer win.stop()
	// The last job's completion is sent with the COMMIT.
	var lastDone struct {
		k       int
		started time.Time
		at      time.Time
		result  string
		stack   string
		t       *task
	}
	lastDone.k = -1
	k := first
	for ; k < len(jobs); k++ {
		if k > first && (ctx.Err() != nil || o.stopping() || !win.take(k)) {
			break
		}
		job := jobs[k]
		if shared {
			claimed[k] = *job
		}
		infos[k].Started = time.Now()
		now := p.now()
		var fenced int64
		var err error
		switch {
		case tx == nil && o.chain != nil && o.chain.begun != nil:
			// The last run's commit began it, and its fence: the run
			// started then.
			tx, fenced, now = o.chain.begun, o.chain.fenced, o.chain.fencedAt
			o.chain.begun = nil
			chainedRuns.Add(1)
		case tx == nil:
			q, args := p.dialect.fence(job, now)
			tx, fenced, err = p.beginRun(bg, q, args...)
		default:
			q, args := p.dialect.fence(job, now)
			fenced, err = tx.exec(q, args...)
		}
		if err != nil {
			return abort(k, nil, fmt.Errorf("async: starting job %d: %w", job.ID, err), "", nil)
		}
		if fenced == 0 {
			setInfo(k, OutcomeSkipped, errorf(ErrLeaseLost, "job %d was cancelled or claimed by another worker before it started", job.ID))
			continue
		}
		job.Started = &now
		// Several jobs in one transaction: each runs in a savepoint, so that
		// a failure rolls back only its own job and can be recorded in the
		// same transaction (Postgres aborts a transaction after a failed
		// statement; rolling back to the savepoint revives it). A job alone
		// in its transaction needs none: its failure rolls the transaction
		// back and is recorded in a fresh one that re-checks the claim.
		sp := fmt.Sprintf("async_job_%d", k-first)
		if shared {
			if err := tx.db.SavePoint(sp).Error; err != nil {
				return abort(k, nil, fmt.Errorf("async: savepoint: %w", err), "", nil)
			}
		}
		t, result, err, stack := p.runTask(ctx, tx, job, o.timeout)
		if ctx.Err() != nil {
			// Shutdown: undo everything and give the jobs back untouched.
			tx.rollback()
			undo(inTx...)
			p.releaseAll(detach(ctx), jobs, append(inTx, k), infos, context.Cause(ctx))
			p.releaseUnstarted(detach(ctx), jobs[k+1:])
			return len(jobs)
		}
		if err == nil {
			done := p.now()
			if k == len(jobs)-1 {
				lastDone.k, lastDone.started, lastDone.at, lastDone.result, lastDone.t, lastDone.stack = k, now, done, result, t, stack
				k++
				break
			}
			_, cerr := tx.exec(completeSQL, now, done, result, job.ID)
			if cerr == nil {
				if wrote == nil {
					wrote = map[int]time.Time{}
				}
				wrote[k] = now
				job.Executed, job.Result, job.LockedBy, job.LockedUntil = &done, result, "", nil
				setInfo(k, OutcomeExecuted, nil)
				inTx = append(inTx, k)
				continue
			}
			// The job fails as if its task had: e.g. the task ignored the
			// error of a statement that aborted its savepoint (Postgres).
			err = fmt.Errorf("async: completing job %d: %w", job.ID, cerr)
		}
		if !shared {
			return abort(k, t, err, stack, nil) // rolls back, records the failure apart
		}
		if rb := tx.db.RollbackTo(sp).Error; rb != nil {
			return abort(k, t, err, stack, nil)
		}
		out, recErr := p.recordFailure(tx.db, job, t, err, stack)
		if recErr != nil {
			return abort(k, t, err, stack, nil)
		}
		setInfo(k, out, err)
		inTx = append(inTx, k)
	}
	if tx != nil {
		var execErr, err error
		if lastDone.k >= 0 {
			job := jobs[lastDone.k]
			var next []*Job
			if c := o.chain; c != nil && !shared && tx.onConn() && ctx.Err() == nil && !o.stopping() {
				next = c.take()
			}
			if next != nil {
				var nt *runTxn
				at := p.now()
				q, args := p.dialect.fence(next[0], at)
				execErr, err, nt, o.chain.fenced = tx.commitThenBegin(completeSQL,
					[]any{lastDone.started, lastDone.at, lastDone.result, job.ID}, q, args)
				o.chain.next, o.chain.begun, o.chain.fencedAt = next, nt, at
			} else {
				execErr, err = tx.commitAfter(completeSQL, lastDone.started, lastDone.at, lastDone.result, job.ID)
			}
			if execErr != nil {
				return abort(lastDone.k, lastDone.t, fmt.Errorf("async: completing job %d: %w", job.ID, execErr), lastDone.stack, &lastDone.started)
			}
			inTx = append(inTx, lastDone.k)
			if err == nil {
				job.Executed, job.Result, job.LockedBy, job.LockedUntil = &lastDone.at, lastDone.result, "", nil
				setInfo(lastDone.k, OutcomeExecuted, nil)
			}
		} else {
			err = tx.commit()
		}
		if err != nil {
			// Which job made the commit fail is unknown: each records a
			// failure. (The commit may have taken effect all the same: the
			// jobs it completed then tell by their start.)
			tx.rollback()
			undo(inTx...)
			for _, i := range inTx {
				var w *time.Time
				if i == lastDone.k {
					w = &lastDone.started
				} else if at, ok := wrote[i]; ok {
					w = &at
				}
				out, e := p.afterBrokenTx(detach(ctx), jobs[i], lookupTask(jobs[i].Name), fmt.Errorf("async: committing job %d: %w", jobs[i].ID, err), "", w)
				setInfo(i, out, e)
			}
		}
	}
	if win.stop() {
		return len(jobs) // the window released the rest
	}
	return k
}

// runTask runs the job's task in the run's transaction tx (callTask, with
// the task's context and handle from startTask). A task that returns no
// error after a statement of its ended the transaction (lostTx) fails.
func (p *Plugin) runTask(ctx context.Context, tx *runTxn, job *Job, timeout time.Duration) (t *task, result string, err error, stack string) {
	tctx, tdb, endTask := tx.startTask(ctx)
	tx.rc.running.Store(job.ID)
	t, result, err, stack = p.callTask(tctx, tdb, job, timeout)
	tx.rc.running.Store(0)
	endTask()
	if err == nil {
		err = tx.lostTx()
	}
	return t, result, err, stack
}

// callTask runs the job's task under the per-job timeout; running out of
// time is an error wrapping ErrTimeout. tx is the task's handle on the job's
// transaction, with ctx as its context (runTxn.startTask).
func (p *Plugin) callTask(ctx context.Context, tx *gorm.DB, job *Job, timeout time.Duration) (t *task, result string, err error, stack string) {
	taskCtx, cancel := ctx, context.CancelFunc(func() {})
	if timeout > 0 {
		taskCtx, cancel = context.WithTimeout(ctx, timeout)
		tx = tx.WithContext(taskCtx)
	}
	defer cancel()
	t = lookupTask(job.Name)
	result, err, stack = p.invoke(taskCtx, tx, job, t)
	if timeout > 0 && ctx.Err() == nil && errors.Is(taskCtx.Err(), context.DeadlineExceeded) {
		cause := err
		if cause == nil {
			cause = context.DeadlineExceeded
		}
		err = errorf(ErrTimeout, "job %d ran longer than %s: %w", job.ID, timeout, cause)
	}
	return t, result, err, stack
}

// invoke calls the task, turning a panic into an error with its stack. tx
// has ctx as its context.
func (p *Plugin) invoke(ctx context.Context, tx *gorm.DB, job *Job, t *task) (result string, err error, stack string) {
	if t == nil {
		return "", errorf(ErrUnknownTask, "%q is not registered in the process that claimed it (%s)", job.Name, job.LockedBy), ""
	}
	defer func() {
		if r := recover(); r != nil {
			stack = string(debug.Stack())
			if e, ok := r.(error); ok {
				err = fmt.Errorf("%w: %w", ErrTaskPanicked, e)
			} else {
				err = fmt.Errorf("%w: %v", ErrTaskPanicked, r)
			}
		}
	}()
	if p.BeforeRun != nil {
		ctx = p.BeforeRun(ctx, tx, job)
		tx = tx.WithContext(ctx)
	}
	result, err = t.call(ctx, tx, job.Args, job.Kwargs)
	if err != nil {
		stack = string(debug.Stack())
	}
	return result, err, stack
}

// taskText logs a job's call (Job.String) only if the record is written:
// building it showed in a busy worker's CPU profile.
type taskText struct{ j *Job }

// LogValue implements slog.LogValuer.
func (t taskText) LogValue() slog.Value { return slog.StringValue(t.j.String()) }

func (p *Plugin) logRun(info RunInfo) {
	j := info.Job
	switch info.Outcome {
	case OutcomeExecuted:
		p.Logger.Debug("async: job executed", "job", j.ID, "task", taskText{j}, "duration", info.Duration)
	case OutcomeRetry:
		sched := ""
		if j.Scheduled != nil {
			sched = j.Scheduled.Format(time.RFC3339Nano)
		}
		p.Logger.Error("async: job failed; rescheduled", "job", j.ID, "task", taskText{j}, "error", info.Err,
			"attempt", j.Attempts, "scheduled", sched, "priority", j.Priority)
	case OutcomeFailed:
		p.Logger.Error("async: job failed for good", "job", j.ID, "task", taskText{j}, "error", info.Err, "attempts", j.Attempts)
	default:
		p.Logger.Info("async: job "+string(info.Outcome), "job", j.ID, "task", taskText{j}, "reason", info.Err)
	}
}

// Execute runs this one job now, in its own transaction, whatever its
// schedule, and returns the task's error after recording it. The job must be
// pending (ErrNotPending) and not leased to a worker or a FlushQueue that
// claimed it (ErrJobClaimed: it is running or about to; its lease ends with
// its run, or at its expiry if that worker died). Do not call it inside
// another transaction: the job's transaction must commit on its own.
func (j *Job) Execute(db *gorm.DB) error {
	p, err := pluginOf(db)
	if err != nil {
		return err
	}
	ctx := ctxOf(db)
	claimed, err := p.claimByID(ctx, j.ID, newOwner(), DefaultLease)
	if err != nil {
		return err
	}
	info := p.runJobs(ctx, []*Job{claimed}, runOptions{})[0]
	*j = *claimed
	if info.Outcome == OutcomeExecuted {
		return nil
	}
	return info.Err
}
