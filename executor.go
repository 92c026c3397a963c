package async

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"strings"
	"time"

	"gorm.io/gorm"
)

// Execution: each job runs in its own transaction (the reference's
// commit_on_success). The task's writes through tx commit together with the
// job's completion; a failure rolls them back to a savepoint taken before the
// task (Postgres aborts a transaction after a failed statement, so the
// savepoint is what lets the failure be recorded in the same transaction),
// records the error with its stack and reschedules the job.

const taskSavepoint = "async_task"

// runOptions tune one run.
type runOptions struct {
	timeout time.Duration // zero: none
}

// run executes a claimed job. ctx is the task's context: cancelling it
// interrupts the run, which is then rolled back and released without
// counting the attempt.
func (p *Plugin) run(ctx context.Context, job *Job, o runOptions) RunInfo {
	info := RunInfo{Job: job, Started: time.Now()}
	var stack string
	_ = p.serialize(func() error {
		info.Outcome, info.Err, stack = p.runTx(ctx, job, o)
		return nil
	})
	info.Duration = time.Since(info.Started)
	p.logRun(info, stack)
	if p.AfterRun != nil {
		p.AfterRun(context.WithoutCancel(ctx), info)
	}
	return info
}

func (p *Plugin) runTx(ctx context.Context, job *Job, o runOptions) (Outcome, error, string) {
	bg := context.WithoutCancel(ctx)
	if ctx.Err() != nil {
		// Interrupted before it started (on SQLite a claimed job may wait
		// for the writer lock until after a shutdown timeout): give the job
		// back without running its task.
		p.release(bg, job)
		return OutcomeInterrupted, context.Cause(ctx), ""
	}
	tx := p.session(bg).Begin()
	if tx.Error != nil {
		return p.afterBrokenTx(bg, job, nil, fmt.Errorf("async: beginning job transaction: %w", tx.Error), "")
	}
	now := p.now()
	fence := tx.Exec("UPDATE "+jobTable+" SET started = ? WHERE id = ? AND locked_by = ? AND attempts = ? AND "+pending(jobTable),
		now, job.ID, job.LockedBy, job.Attempts)
	if fence.Error != nil {
		tx.Rollback()
		return p.afterBrokenTx(bg, job, nil, fmt.Errorf("async: starting job %d: %w", job.ID, fence.Error), "")
	}
	if fence.RowsAffected == 0 {
		tx.Rollback()
		return OutcomeSkipped, errorf(ErrLeaseLost, "job %d was cancelled or claimed by another worker before it started", job.ID), ""
	}
	job.Started = &now
	if err := tx.SavePoint(taskSavepoint).Error; err != nil {
		tx.Rollback()
		return p.afterBrokenTx(bg, job, nil, fmt.Errorf("async: savepoint: %w", err), "")
	}

	taskCtx, cancel := ctx, context.CancelFunc(func() {})
	if o.timeout > 0 {
		taskCtx, cancel = context.WithTimeout(ctx, o.timeout)
	}
	defer cancel()
	t := lookupTask(job.Name)
	result, err, stack := p.invoke(taskCtx, tx, job, t)
	switch {
	case ctx.Err() != nil:
		// Shutdown: undo everything and give the job back untouched.
		tx.Rollback()
		p.release(bg, job)
		return OutcomeInterrupted, context.Cause(ctx), ""
	case o.timeout > 0 && errors.Is(taskCtx.Err(), context.DeadlineExceeded):
		err = errorf(ErrTimeout, "job %d ran longer than %s (task error: %v)", job.ID, o.timeout, err)
	}
	if err == nil {
		done := p.now()
		res := tx.Exec("UPDATE "+jobTable+" SET executed = ?, result = ?, locked_by = '', locked_until = NULL WHERE id = ?",
			done, result, job.ID)
		if res.Error == nil {
			if err = tx.Commit().Error; err == nil {
				job.Executed, job.Result, job.LockedBy, job.LockedUntil = &done, result, "", nil
				return OutcomeExecuted, nil, ""
			}
			err = fmt.Errorf("async: committing job %d: %w", job.ID, err)
		} else {
			err = fmt.Errorf("async: completing job %d: %w", job.ID, res.Error)
		}
		tx.Rollback()
		return p.afterBrokenTx(bg, job, t, err, stack)
	}
	if rb := tx.RollbackTo(taskSavepoint).Error; rb != nil {
		tx.Rollback()
		return p.afterBrokenTx(bg, job, t, err, stack)
	}
	outcome, recErr := p.recordFailure(tx, job, t, err, stack)
	if recErr == nil {
		recErr = tx.Commit().Error
	}
	if recErr != nil {
		tx.Rollback()
		return p.afterBrokenTx(bg, job, t, err, stack)
	}
	return outcome, err, stack
}

// afterBrokenTx records a failure in a fresh transaction when the job's own
// transaction can no longer be used.
func (p *Plugin) afterBrokenTx(ctx context.Context, job *Job, t *task, err error, stack string) (Outcome, error, string) {
	job.Started = nil
	var outcome Outcome
	recErr := p.session(ctx).Transaction(func(tx *gorm.DB) error {
		e := p.dialect.beginWrite(tx)
		if e != nil {
			return e
		}
		outcome, e = p.recordFailure(tx, job, t, err, stack)
		return e
	})
	if recErr != nil {
		// The database is unreachable: the lease will expire and the job will
		// be claimed again; nothing of this run was committed.
		p.Logger.Error("async: could not record job failure; the job runs again when its lease expires",
			"job", job.ID, "error", err, "record_error", recErr)
		return OutcomeRetry, err, stack
	}
	return outcome, err, stack
}

// invoke calls the task, turning a panic into an error with its stack.
func (p *Plugin) invoke(ctx context.Context, tx *gorm.DB, job *Job, t *task) (result string, err error, stack string) {
	if t == nil {
		return "", errorf(ErrUnknownTask, "%q is not registered in this process", job.Name), string(debug.Stack())
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
	}
	result, err = t.call(ctx, tx.WithContext(ctx), job.Args, job.Kwargs)
	if err != nil {
		stack = string(debug.Stack())
	}
	return result, err, stack
}

// recordFailure writes the error row and reschedules the job, or ends it
// failed when it is out of attempts or the error is permanent. It does
// nothing if the job's claim was taken over.
func (p *Plugin) recordFailure(tx *gorm.DB, job *Job, t *task, taskErr error, stack string) (Outcome, error) {
	now := p.now()
	var failures int64
	if err := tx.Model(&JobError{}).Where("job_id = ?", job.ID).Count(&failures).Error; err != nil {
		return "", err
	}
	failures++
	outcome := OutcomeRetry
	var res *gorm.DB
	if errors.Is(taskErr, ErrPermanent) || (job.MaxAttempts > 0 && job.Attempts >= job.MaxAttempts) {
		outcome = OutcomeFailed
		res = tx.Exec("UPDATE "+jobTable+" SET failed = ?, started = NULL, executed = NULL, locked_by = '', locked_until = NULL WHERE id = ? AND locked_by = ? AND attempts = ?",
			now, job.ID, job.LockedBy, job.Attempts)
		job.Failed = &now
	} else {
		delay, prio := p.retryPolicy(t)(job, int(failures))
		next := now.Add(delay)
		res = tx.Exec("UPDATE "+jobTable+" SET scheduled = ?, priority = ?, started = NULL, executed = NULL, locked_by = '', locked_until = NULL WHERE id = ? AND locked_by = ? AND attempts = ?",
			next, prio, job.ID, job.LockedBy, job.Attempts)
		job.Scheduled, job.Priority = &next, prio
	}
	if res.Error != nil {
		return "", res.Error
	}
	job.Started, job.LockedBy, job.LockedUntil = nil, "", nil
	if res.RowsAffected == 0 {
		return OutcomeSkipped, nil
	}
	rec := JobError{JobID: job.ID, Executed: now, Exception: exceptionText(taskErr), Traceback: traceback(taskErr, stack)}
	if err := tx.Create(&rec).Error; err != nil {
		return "", err
	}
	return outcome, nil
}

// release gives an interrupted job back: lease cleared, attempt uncounted.
// Idle workers of this process are woken, so that one of them takes the job
// at once instead of at its next poll.
func (p *Plugin) release(ctx context.Context, job *Job) {
	err := p.session(ctx).Exec("UPDATE "+jobTable+" SET attempts = attempts - 1, locked_by = '', locked_until = NULL WHERE id = ? AND locked_by = ? AND attempts = ?",
		job.ID, job.LockedBy, job.Attempts).Error
	if err != nil {
		p.Logger.Error("async: releasing interrupted job; it runs again when its lease expires", "job", job.ID, "error", err)
		return
	}
	p.wakers.broadcast()
}

func exceptionText(err error) string {
	inner := err
	for {
		u := errors.Unwrap(inner)
		if u == nil {
			break
		}
		inner = u
	}
	return fmt.Sprintf("%T: %v", inner, err)
}

func traceback(err error, stack string) string {
	var b strings.Builder
	b.WriteString("error chain:\n")
	for e := err; e != nil; e = errors.Unwrap(e) {
		fmt.Fprintf(&b, "  %T: %v\n", e, e)
	}
	if stack != "" {
		b.WriteString("\n")
		b.WriteString(stack)
	}
	return b.String()
}

func (p *Plugin) logRun(info RunInfo, stack string) {
	j := info.Job
	switch info.Outcome {
	case OutcomeExecuted:
		p.Logger.Debug("async: job executed", "job", j.ID, "task", j.String(), "duration", info.Duration)
	case OutcomeRetry:
		sched := ""
		if j.Scheduled != nil {
			sched = j.Scheduled.Format(time.RFC3339Nano)
		}
		p.Logger.Error("async: job failed; rescheduled", "job", j.ID, "task", j.String(), "error", info.Err,
			"attempt", j.Attempts, "scheduled", sched, "priority", j.Priority)
	case OutcomeFailed:
		p.Logger.Error("async: job failed for good", "job", j.ID, "task", j.String(), "error", info.Err, "attempts", j.Attempts)
	default:
		p.Logger.Info("async: job "+string(info.Outcome), "job", j.ID, "task", j.String(), "reason", info.Err)
	}
}

// Execute runs this one job now, in its own transaction, whatever its
// schedule, and returns the task's error after recording it. The job must be
// pending. Do not call it inside another transaction: the job's transaction
// must commit on its own.
func (j *Job) Execute(db *gorm.DB) error {
	p, err := pluginOf(db)
	if err != nil {
		return err
	}
	ctx := db.Statement.Context
	if ctx == nil {
		ctx = context.Background()
	}
	claimed, err := p.claimByID(ctx, j.ID, newOwner(), DefaultLease)
	if err != nil {
		return err
	}
	info := p.run(ctx, claimed, runOptions{})
	*j = *claimed
	if info.Outcome == OutcomeExecuted {
		return nil
	}
	return info.Err
}
