package async

import (
	"context"
	"strings"
	"time"
)

// Group commit, optimistic. When a worker runs K > 1 jobs in one transaction
// it first runs their tasks back to back with no savepoint and no per-job
// statement of its own, then completes all of them in one UPDATE that also
// re-checks every claim (locked_by, attempts), and commits once. A job's
// writes still commit in the same transaction as its completion. If any task
// fails, or a claim was lost, the transaction is rolled back and the jobs go
// through the careful path (runTx: one savepoint per job, so that a failure
// rolls back only its own job); the failing job's error is recorded without
// running it again, unless the error says that an earlier task had left the
// transaction aborted (Postgres): then the failing job runs again with the
// others, so that the failure is recorded against the job that caused it.
// Tasks that already ran in the rolled-back transaction run again, which the
// at-least-once guarantee for external effects allows.

// runOptimistic runs jobs[first:] in one transaction and returns the index
// of the first job it did not take.
func (p *Plugin) runOptimistic(ctx context.Context, jobs []*Job, infos []RunInfo, first int, o runOptions) int {
	bg := context.WithoutCancel(ctx)
	tx, _, err := p.beginRun(bg, p.dialect.beginWriteSQL())
	if err != nil {
		return p.runTx(ctx, jobs, infos, first, o)
	}
	win := p.batchWindow(bg, jobs, first, o.window)
	defer win.stop()
	// careful reruns jobs[first:upto] with a savepoint each, then says where
	// to go on from.
	careful := func(upto int) int {
		tx.rollback()
		released := win.stop()
		for next := first; next < upto; {
			next = p.runTx(ctx, jobs[:upto], infos[:upto], next, runOptions{timeout: o.timeout})
		}
		if released {
			return len(jobs) // the window released the rest
		}
		return upto
	}
	var results []string
	var starts []time.Time
	k := first
	for ; k < len(jobs); k++ {
		if k > first && (ctx.Err() != nil || o.stopping() || !win.take(k)) {
			break
		}
		job := jobs[k]
		infos[k].Started = time.Now()
		starts = append(starts, p.now())
		t, result, err, stack := p.runTask(ctx, tx, job, o.timeout)
		if ctx.Err() != nil {
			tx.rollback()
			win.stop()
			p.releaseUnstarted(detach(ctx), jobs[first:])
			for i := first; i <= k; i++ {
				infos[i].Outcome, infos[i].Err = OutcomeInterrupted, context.Cause(ctx)
				infos[i].Duration = time.Since(infos[i].Started)
			}
			return len(jobs)
		}
		if err != nil && k > first && txAborted(err) {
			// An earlier task of the batch left the transaction aborted
			// (it ignored the error of a statement that failed), and this
			// job is not at fault: all of them up to this one run again,
			// each in a savepoint of its own, where the failure falls on
			// the job that caused it.
			return careful(k + 1)
		}
		if err != nil {
			// Record this failure on its own, then redo the others carefully.
			tx.rollback()
			out, e := p.afterBrokenTx(detach(ctx), job, t, err, stack, nil) // rolled back
			infos[k].Outcome, infos[k].Err = out, e
			infos[k].Duration = time.Since(infos[k].Started)
			next := careful(k)
			if next == len(jobs) {
				return next
			}
			return k + 1
		}
		results = append(results, result)
	}
	batch := jobs[first:k]
	if len(batch) == 0 {
		tx.rollback()
		return k
	}
	done := p.now()
	q, args := p.dialect.completeAllSQL(batch, starts, results, done)
	// Not sent with the COMMIT: the count must be checked first.
	n, err := tx.exec(q, args...)
	if err != nil || n != int64(len(batch)) {
		return careful(k) // a claim was lost, or the database failed: go job by job
	}
	if err := tx.commit(); err != nil {
		return careful(k)
	}
	for i, job := range batch {
		job.Started, job.Executed, job.Result, job.LockedBy, job.LockedUntil = &starts[i], &done, results[i], "", nil
		infos[first+i].Outcome = OutcomeExecuted
		infos[first+i].Duration = time.Since(infos[first+i].Started)
	}
	if win.stop() {
		return len(jobs)
	}
	return k
}

// completeAllCaseSQL marks jobs executed in one statement, each with its own
// start time and result (one CASE over the ids per column), only where each
// claim still holds.
func completeAllCaseSQL(jobs []*Job, starts []time.Time, results []string, done time.Time, timeParam string) (string, []any) {
	var b strings.Builder
	args := make([]any, 0, 7*len(jobs)+3)
	b.WriteString("UPDATE " + jobTable + " SET executed = ?, locked_by = '', locked_until = NULL, started = CASE id")
	args = append(args, done)
	for i, j := range jobs {
		b.WriteString(" WHEN ? THEN " + timeParam)
		args = append(args, j.ID, starts[i])
	}
	b.WriteString(" END, result = CASE id")
	for i, j := range jobs {
		b.WriteString(" WHEN ? THEN ?")
		args = append(args, j.ID, results[i])
	}
	b.WriteString(" END WHERE " + stillPending + " AND ")
	args = appendClaimsHold(&b, args, jobs)
	return b.String(), args
}

// appendClaimsHold writes to b the condition that each of jobs' claims still
// holds (the same owner, the same attempt) and returns args with its
// arguments. The jobs share one owner.
func appendClaimsHold(b *strings.Builder, args []any, jobs []*Job) []any {
	b.WriteString("locked_by = ? AND ")
	args = append(args, jobs[0].LockedBy)
	if len(jobs) == 1 {
		b.WriteString("id = ? AND attempts = ?")
		return append(args, jobs[0].ID, jobs[0].Attempts)
	}
	b.WriteString("(id, attempts) IN (")
	for i, j := range jobs {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString("(?, ?)")
		args = append(args, j.ID, j.Attempts)
	}
	b.WriteString(")")
	return args
}
