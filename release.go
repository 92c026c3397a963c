package async

import (
	"context"
	"time"
)

// Releasing gives claimed jobs back to the queue without counting their
// attempt: jobs whose runs were rolled back (at shutdown, or when the
// transaction they shared with another job broke) and jobs a batch never
// started.

// releaseAll gives back jobs whose runs were rolled back: lease cleared,
// attempt uncounted, so they run again at once.
func (p *Plugin) releaseAll(ctx context.Context, jobs []*Job, idx []int, infos []RunInfo, why error) {
	for _, k := range idx {
		p.release(ctx, jobs[k])
		infos[k].Outcome, infos[k].Err = OutcomeInterrupted, why
		infos[k].Duration = time.Since(infos[k].Started)
	}
}

// releaseUnstarted gives back claimed jobs that never started.
func (p *Plugin) releaseUnstarted(ctx context.Context, jobs []*Job) {
	for _, j := range jobs {
		p.release(ctx, j)
	}
}

// release clears a job's lease and uncounts its attempt. The process's
// claim hints are dropped and its idle workers woken, so that one of them
// takes the job at once, in run order, instead of at its next poll.
func (p *Plugin) release(ctx context.Context, job *Job) {
	err := p.session(ctx).Exec("UPDATE "+jobTable+" SET attempts = attempts - 1, started = NULL, locked_by = '', locked_until = NULL WHERE id = ? AND locked_by = ? AND attempts = ?",
		job.ID, job.LockedBy, job.Attempts).Error
	if err != nil {
		p.Logger.Error("async: releasing job; it runs again when its lease expires", "job", job.ID, "error", err)
		return
	}
	job.Started = nil
	p.hints.forget() // the job may lie below them: the next claim reads from the head
	p.wakers.broadcast()
}
