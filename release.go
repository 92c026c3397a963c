package async

import (
	"context"
	"strings"
	"time"
)

// Releasing gives claimed jobs back to the queue without counting their
// attempt: jobs whose runs were rolled back (at shutdown, or when the
// transaction they shared with another job broke) and jobs a batch never
// started.

// releaseAll gives back jobs whose runs were rolled back: lease cleared,
// attempt uncounted, so they run again at once.
func (p *Plugin) releaseAll(ctx context.Context, jobs []*Job, idx []int, infos []RunInfo, why error) {
	back := make([]*Job, len(idx))
	for i, k := range idx {
		back[i] = jobs[k]
	}
	p.releaseUnstarted(ctx, back)
	for _, k := range idx {
		infos[k].Outcome, infos[k].Err = OutcomeInterrupted, why
		infos[k].Duration = time.Since(infos[k].Started)
	}
}

// releaseUnstarted gives back claimed jobs, one statement for each run of
// jobs with the same owner (a batch or a claim has one), chunked under the
// placeholder limit. The process's claim hints are dropped and its idle
// workers woken, so that one of them takes the jobs at once, in run order,
// instead of at its next poll.
func (p *Plugin) releaseUnstarted(ctx context.Context, jobs []*Job) {
	if len(jobs) == 0 {
		return
	}
	most := max(1, (p.dialect.maxParams()-1)/2)
	for rest := jobs; len(rest) > 0; {
		n := 1
		for n < len(rest) && n < most && rest[n].LockedBy == rest[0].LockedBy {
			n++
		}
		p.release(ctx, rest[:n])
		rest = rest[n:]
	}
	p.hints.forget() // the jobs may lie below them: the next claim reads from the head
	p.wakers.broadcast()
}

// release clears the leases of jobs that share an owner and uncounts their
// attempts, where each claim still holds.
func (p *Plugin) release(ctx context.Context, jobs []*Job) {
	q, args := releaseSQL(jobs)
	if err := p.session(ctx).Exec(q, args...).Error; err != nil {
		ids := make([]int64, len(jobs))
		for i, j := range jobs {
			ids[i] = j.ID
		}
		p.Logger.Error("async: releasing jobs; they run again when their lease expires", "jobs", ids, "error", err)
		return
	}
	for _, j := range jobs {
		j.Started = nil
	}
	p.released.Add(int64(len(jobs)))
}

// releaseSQL is release's statement for jobs of one owner.
func releaseSQL(jobs []*Job) (string, []any) {
	var b strings.Builder
	b.WriteString("UPDATE " + jobTable + " SET attempts = attempts - 1, started = NULL, locked_by = '', locked_until = NULL WHERE ")
	args := appendClaimsHold(&b, make([]any, 0, 1+2*len(jobs)), jobs)
	return b.String(), args
}
