package async

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"
)

// FlushOptions configure FlushQueue, mirroring the reference's flush_queue options.
type FlushOptions struct {
	// Jobs is the most jobs to run; zero means 300.
	Jobs int
	// Which and OutOf partition the queue by job id: this run takes only jobs
	// with id % OutOf == Which % OutOf. OutOf <= 1 means no partitioning. At
	// most one FlushQueue runs per partition at a time, across all hosts.
	Which, OutOf int
	// Filter runs only jobs whose task name starts with this prefix, taken
	// literally and case-sensitively (% and _ are not wildcards).
	Filter string
	// Queues limits the run to these queues; empty means every queue.
	Queues []string
	// Timeout bounds each job's run; zero means none.
	Timeout time.Duration
	// Out, if set, receives a line "<id>: <job text>" before each job runs.
	Out io.Writer
}

// DefaultFlushJobs is the job limit of a FlushQueue run when Jobs is zero.
const DefaultFlushJobs = 300

// FlushQueue runs through the jobs due at its start, like the reference's
// flush_queue: highest priority first; within a priority, due scheduled jobs
// by (scheduled, id), then unscheduled jobs by id. It stops at the first
// failing job and returns its error, after recording it. It returns how many
// jobs ran (a failing one included). A group's final job waits for the rest
// of its group. When another run holds the same partition it returns
// ErrPartitionBusy at once. The context of db cancels the run (a claim
// under way then finishes, and its job goes back to the queue at once);
// what the database has not answered 30s after that is abandoned, and the
// job runs again when its lease expires.
func FlushQueue(db *gorm.DB, opts FlushOptions) (int, error) {
	p, err := pluginOf(db)
	if err != nil {
		return 0, err
	}
	if opts.Jobs < 0 || opts.OutOf < 0 {
		return 0, errorf(ErrBadOption, "flush_queue: jobs (%d) and outof (%d) must not be negative", opts.Jobs, opts.OutOf)
	}
	limit := opts.Jobs
	if limit == 0 {
		limit = DefaultFlushJobs
	}
	// What a cancelled run still does (its rollback, give-back, failure
	// record), and the partition lock's release, get flushBookkeeping after
	// ctx ends; then they are abandoned, so that FlushQueue returns even if
	// the database stopped answering (jobs run again when their lease
	// expires, the partition is free when its lock does).
	ctx, end := withHardStop(ctxOf(db), flushBookkeeping)
	defer end()
	owner := newOwner()
	which := 0
	if opts.OutOf > 1 {
		which = ((opts.Which % opts.OutOf) + opts.OutOf) % opts.OutOf
	}
	release, err := p.acquireLock(ctx, fmt.Sprintf("flush_queue:%d/%d", which, max(opts.OutOf, 1)), owner)
	if err != nil {
		return 0, err
	}
	defer release()

	f := &claimFilter{dueBy: p.now(), queues: opts.Queues, prefix: opts.Filter, which: which, outOf: opts.OutOf,
		limit: 1, lease: DefaultLease, owner: owner}
	ran := 0
	for ran < limit {
		if err := ctx.Err(); err != nil {
			return ran, err
		}
		// A claimed job goes back at once if ctx has ended meanwhile
		// (runJobs).
		jobs, err := p.claimUncancelled(ctx, f)
		if err != nil {
			return ran, err
		}
		if len(jobs) == 0 {
			break
		}
		job := jobs[0]
		if opts.Out != nil {
			fmt.Fprintf(opts.Out, "%d: %s\n", job.ID, job)
		}
		info := p.runJobs(ctx, []*Job{job}, runOptions{timeout: opts.Timeout})[0]
		switch info.Outcome {
		case OutcomeExecuted:
			ran++
		case OutcomeRetry, OutcomeFailed:
			return ran + 1, info.Err
		case OutcomeInterrupted:
			return ran, info.Err
		}
	}
	return ran, nil
}

// flushBookkeeping is how long FlushQueue's bookkeeping may go on after its
// context has ended.
var flushBookkeeping = 30 * time.Second

// lockTTL is how long a partition lock survives its holder without renewal.
const lockTTL = 30 * time.Second

// acquireLock takes the named database lock or returns ErrPartitionBusy. The
// lock is renewed in the background until release is called; a crashed
// holder's lock expires after lockTTL.
func (p *Plugin) acquireLock(ctx context.Context, name, owner string) (release func(), err error) {
	now := p.now()
	db := p.session(ctx)
	err = p.serializeEntry(ctx, "flush_queue", func() error {
		res := db.Exec("UPDATE "+lockTable+" SET owner = ?, expires = ? WHERE name = ? AND expires < ?", owner, now.Add(lockTTL), name, now)
		if res.Error != nil || res.RowsAffected == 1 {
			return res.Error
		}
		res = db.Clauses(clause.OnConflict{DoNothing: true}).Create(&partitionLock{Name: name, Owner: owner, Expires: now.Add(lockTTL)})
		if res.Error == nil && res.RowsAffected == 0 {
			return errorf(ErrPartitionBusy, "lock %q is held", name)
		}
		return res.Error
	})
	if err != nil {
		if errors.Is(err, ErrPartitionBusy) || errors.Is(err, ErrWriterBusy) {
			return nil, err
		}
		return nil, fmt.Errorf("async: taking lock %q: %w", name, err)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(lockTTL / 3)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				err := p.serialize(func() error {
					return p.session(detach(ctx)).Exec("UPDATE "+lockTable+" SET expires = ? WHERE name = ? AND owner = ?",
						p.now().Add(lockTTL), name, owner).Error
				})
				if err != nil {
					p.Logger.Warn("async: renewing lock failed", "lock", name, "error", err)
				}
			}
		}
	}()
	return func() {
		close(stop)
		<-done
		_ = p.serialize(func() error {
			return p.session(detach(ctx)).Exec("DELETE FROM "+lockTable+" WHERE name = ? AND owner = ?", name, owner).Error
		})
	}, nil
}
