package async

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"gorm.io/gorm"
)

// Failure recording: a failed run leaves an error row (the error chain and
// its stack) and, unless its claim was taken over, reschedules its job by
// its retry policy or ends it failed.

// afterBrokenTx records a failure in a fresh transaction when the job's own
// transaction can no longer be used. wrote is nil when that transaction
// certainly did not commit (it was rolled back: the task failed, or a
// statement before the completion did); when its commit may have taken
// effect though an error was reported, wrote is the start time its
// completion wrote, by which executedBy tells the run's own commit from
// another run's.
func (p *Plugin) afterBrokenTx(ctx context.Context, job *Job, t *task, err error, stack string, wrote *time.Time) (Outcome, error) {
	job.Started = nil
	var outcome Outcome
	recErr := p.writeTx(p.session(ctx), func(tx *gorm.DB) error {
		var e error
		outcome, e = p.recordFailure(tx, job, t, err, stack)
		return e
	})
	if recErr != nil {
		// The database is unreachable: the lease will expire and the job will
		// be claimed again; nothing of this run was committed.
		p.Logger.Error("async: could not record job failure; the job runs again when its lease expires",
			"job", job.ID, "error", err, "record_error", recErr)
		return OutcomeRetry, err
	}
	if outcome == OutcomeSkipped && wrote != nil && p.executedBy(ctx, job, *wrote) {
		// The run's COMMIT took effect though its outcome could not be
		// read (the connection died after it): the job is executed by
		// this very run.
		p.Logger.Warn("async: a run's commit reported an error but took effect; the job is executed",
			"job", job.ID, "error", err)
		return OutcomeExecuted, nil
	}
	return outcome, err
}

// executedBy reports whether job is executed by the run whose claim job
// holds and whose completion wrote started: the same attempt and the same
// start time. The attempt alone does not tell: Retry resets the count and
// a release uncounts an attempt, so a later run may have the same.
func (p *Plugin) executedBy(ctx context.Context, job *Job, started time.Time) bool {
	var row struct {
		Executed *time.Time
		Started  *time.Time
		Attempts int
	}
	err := p.session(ctx).Raw("SELECT executed, started, attempts FROM "+jobTable+" WHERE id = ?", job.ID).Scan(&row).Error
	if err != nil || row.Executed == nil || row.Attempts != job.Attempts || row.Started == nil || !row.Started.Equal(started) {
		return false
	}
	job.Executed, job.LockedBy, job.LockedUntil = row.Executed, "", nil
	return true
}

// claimHeld is recordFailure's test that the failed run's claim still
// holds: the same owner and attempt, and the job still pending (it may have
// been cancelled while its run's transaction was rolled back, or, with group
// commit, while it ran).
const claimHeld = "id = ? AND locked_by = ? AND attempts = ? AND " + stillPending

// recordFailure writes the error row and reschedules the job, or ends it
// failed when it is out of attempts or the error is permanent. It does
// nothing if the job's claim was taken over or the job is no longer
// pending.
func (p *Plugin) recordFailure(tx *gorm.DB, job *Job, t *task, taskErr error, stack string) (Outcome, error) {
	now := p.now()
	var failures int64
	if err := tx.Model(&JobError{}).Where("job_id = ?", job.ID).Count(&failures).Error; err != nil {
		return "", err
	}
	failures++
	outcome := OutcomeRetry
	var res *gorm.DB
	var update func() // the job's new state, once written
	switch {
	case t == nil && errors.Is(taskErr, ErrUnknownTask):
		// This process does not register the job's task (a rolling
		// deploy's old version, a process serving the queue with other
		// tasks): the job did not run. It is put off by the retry delay,
		// for a process that knows the task, its attempt given back and
		// its priority kept, so that it never ends failed for it.
		delay, _ := p.retryPolicy(nil)(job, int(failures))
		next := now.Add(delay).Truncate(time.Microsecond) // as stored
		res = tx.Exec("UPDATE "+jobTable+" SET scheduled = ?, attempts = attempts - 1, started = NULL, executed = NULL, locked_by = '', locked_until = NULL WHERE "+claimHeld,
			next, job.ID, job.LockedBy, job.Attempts)
		update = func() { job.Scheduled, job.Attempts = &next, job.Attempts-1 }
	case errors.Is(taskErr, ErrPermanent) || (job.MaxAttempts > 0 && job.Attempts >= job.MaxAttempts):
		outcome = OutcomeFailed
		res = tx.Exec("UPDATE "+jobTable+" SET failed = ?, started = NULL, executed = NULL, locked_by = '', locked_until = NULL WHERE "+claimHeld,
			now, job.ID, job.LockedBy, job.Attempts)
		update = func() { job.Failed = &now }
	default:
		delay, prio := p.retryPolicy(t)(job, int(failures))
		next := now.Add(delay).Truncate(time.Microsecond) // as stored
		res = tx.Exec("UPDATE "+jobTable+" SET scheduled = ?, priority = ?, started = NULL, executed = NULL, locked_by = '', locked_until = NULL WHERE "+claimHeld,
			next, prio, job.ID, job.LockedBy, job.Attempts)
		update = func() { job.Scheduled, job.Priority = &next, prio }
	}
	if res.Error != nil {
		return "", res.Error
	}
	if res.RowsAffected == 0 {
		return OutcomeSkipped, nil
	}
	update()
	job.Started, job.LockedBy, job.LockedUntil = nil, "", nil
	rec := JobError{JobID: job.ID, Executed: now, Exception: exceptionText(taskErr), Traceback: traceback(taskErr, stack)}
	if err := tx.Create(&rec).Error; err != nil {
		return "", err
	}
	return outcome, nil
}

// exceptionText is an error row's exception: the innermost error's type and
// the whole error's text.
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

// traceback is an error row's traceback: the error chain, one line per
// error, then the stack.
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
