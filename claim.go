package async

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"gorm.io/gorm"
)

// Claiming is the one way a job is taken for a run, shared by FlushQueue, the
// Worker and Job.Execute. A claim is a short transaction that counts the
// attempt and sets a lease (locked_by, locked_until); the run then happens in
// the job's own transaction, whose first statement re-checks the claim and
// locks the job row until commit. A crashed worker's lease expires and the
// job is claimed again; a live run keeps its row locked, so no other claim
// can take it however long it runs.

// DefaultLease is how long a claim reserves a job before its run starts
// and, after a crash, how long until the job can be claimed again.
const DefaultLease = time.Minute

// claimFilter selects the jobs a claim may take.
type claimFilter struct {
	queues []string  // empty: any queue
	dueBy  time.Time // zero: the current time
	prefix string    // task name prefix, matched literally
	which  int
	outOf  int // > 1 partitions by job id
	limit  int
	lease  time.Duration
	owner  string
}

func newOwner() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

const pendingSQL = "%[1]s.executed IS NULL AND %[1]s.cancelled IS NULL AND %[1]s.failed IS NULL"

func pending(alias string) string { return fmt.Sprintf(pendingSQL, alias) }

// claimTimeout bounds a claim that its caller's context does not cancel
// (claimUncancelled).
const claimTimeout = 30 * time.Second

// claimUncancelled is claim with ctx's values but not its cancellation,
// bounded by claimTimeout instead: a claim is sent in one piece, and a
// server that has read it commits it even if this side stopped waiting,
// which would lease its jobs to a caller gone until the lease expires.
// Callers give back at once what they claimed after ctx ended (Worker.Run,
// FlushQueue).
func (p *Plugin) claimUncancelled(ctx context.Context, f *claimFilter) ([]*Job, error) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), claimTimeout)
	defer cancel()
	return p.claim(cctx, f)
}

// claim takes up to f.limit runnable jobs for f.owner, in run order. Jobs
// whose attempts ran out without a recorded result (their workers died) end
// failed here instead.
func (p *Plugin) claim(ctx context.Context, f *claimFilter) ([]*Job, error) {
	var jobs []*Job
	now := p.now()
	lease := now.Add(f.lease)
	err := p.serialize(func() error {
		return retryDeadlock(ctx, func() error {
			var err error
			switch p.dialect.claimStrategy() {
			case claimByOneUpdate:
				jobs, err = p.claimOneUpdate(ctx, f, now, lease)
			case claimByHalfUpdates:
				jobs, err = p.claimHalfUpdates(p.session(ctx), f, now, lease)
			default: // claimByWalkTx
				jobs, err = p.claimWalkTx(ctx, f, now, lease)
			}
			return err
		})
	})
	if err != nil {
		return nil, fmt.Errorf("async: claiming jobs: %w", err)
	}
	claimed := jobs[:0]
	var exhausted []int64
	for _, j := range jobs {
		j.normalize()
		if j.MaxAttempts > 0 && j.Attempts > j.MaxAttempts {
			exhausted = append(exhausted, j.ID)
			continue
		}
		claimed = append(claimed, j)
	}
	if len(exhausted) > 0 {
		if err := p.failExhausted(ctx, exhausted, f.owner, now); err != nil {
			// The jobs claimed with them still run; these are found again,
			// still exhausted, once this claim's lease on them expires.
			p.Logger.Error("async: could not end jobs whose attempts ran out; tried again when their lease expires",
				"jobs", exhausted, "error", err)
		} else if len(claimed) == 0 {
			return p.claim(ctx, f) // those are out of the way: look again
		}
	}
	if dropped := p.dropWaitingFinals(ctx, &claimed); dropped && len(claimed) == 0 {
		return p.claim(ctx, f) // those wait for their groups: look again
	}
	sort.Slice(claimed, func(a, b int) bool { return runsBefore(claimed[a], claimed[b]) })
	return claimed, nil
}

// dropWaitingFinals gives back the group final jobs among the jobs a claim
// took whose group has another job pending after all, and reports whether
// it gave any back. The claim's own test of that can read a group as it was
// before a job joined it, the job's transaction committed before the claim
// locked the final job's row: its read of the job rows it takes sees their
// newest version, but the group test, a subquery, sees the snapshot its
// statement began with (Postgres) or took at its first use (MySQL). Read
// after the claim has committed, the group shows every job that joined it
// before then, and a job that joins it later takes the claim back itself
// (holdFinal). SQLite, whose one writer keeps claims and scheduling apart,
// needs none of this.
func (p *Plugin) dropWaitingFinals(ctx context.Context, jobs *[]*Job) bool {
	if p.dialect.singleWriter {
		return false
	}
	var ids []int64
	for _, j := range *jobs {
		if j.GroupID != nil {
			ids = append(ids, j.ID)
		}
	}
	if len(ids) == 0 {
		return false
	}
	waiting := map[int64]bool{}
	for chunk := range slices.Chunk(ids, idChunk) {
		var got []int64
		err := p.session(ctx).Raw("SELECT j.id FROM "+jobTable+" j JOIN "+groupTable+" g ON g.id = j.group_id AND g.final_id = j.id"+
			" WHERE j.id IN ? AND EXISTS (SELECT 1 FROM "+jobTable+" o WHERE o.group_id = g.id AND o.id <> j.id AND "+pending("o")+")", chunk).
			Scan(&got).Error
		if err != nil {
			// Leased already: they run, as before this test.
			p.Logger.Warn("async: could not check claimed final jobs against their groups", "jobs", ids, "error", err)
			return false
		}
		for _, id := range got {
			waiting[id] = true
		}
	}
	if len(waiting) == 0 {
		return false
	}
	var back []*Job
	kept := (*jobs)[:0]
	for _, j := range *jobs {
		if waiting[j.ID] {
			back = append(back, j)
		} else {
			kept = append(kept, j)
		}
	}
	*jobs = kept
	p.release(ctx, back) // one claim: one owner
	return true
}

// claimOneUpdate is the claimByOneUpdate strategy, one statement: UPDATE
// ... WHERE id IN (claimIDs: SELECT ... FOR UPDATE SKIP LOCKED) RETURNING
// jobColumnList.
func (p *Plugin) claimOneUpdate(ctx context.Context, f *claimFilter, now, lease time.Time) ([]*Job, error) {
	sel, args := p.claimIDs(f, now)
	set := "UPDATE " + jobTable + " SET attempts = attempts + 1, locked_by = ?, locked_until = ?"
	if p.dialect.pipeline && p.sqlDB != nil {
		return pipeClaim(ctx, p.sqlDB, set+" WHERE id IN ("+sel+") RETURNING "+jobColumnList, append([]any{f.owner, lease}, args...))
	}
	q := set + p.dialect.lazyCommitFrom() + " WHERE " + jobTable + ".id IN (" + sel + ") RETURNING " + jobColumnsTable // not the FROM item's columns
	return p.queryJobs(p.session(ctx), q, append([]any{f.owner, lease}, args...)...)
}

// claimHalfUpdates is the claimByHalfUpdates strategy: walkClaim, each half
// taken by one UPDATE ... WHERE id IN (half) RETURNING, which re-reads the
// half at the database's write lock, so that the claim needs no transaction
// of its own.
func (p *Plugin) claimHalfUpdates(db *gorm.DB, f *claimFilter, now, lease time.Time) ([]*Job, error) {
	conds, cargs := p.claimConds(f, now)
	due := f.dueTime(now)
	jobs, err := p.walkClaim(p.hotQueryOn(db), f, now, "", func(prio int, set dueSet, want int) ([]*Job, error) {
		q := "UPDATE " + jobTable + " SET attempts = attempts + 1, locked_by = ?, locked_until = ? WHERE id IN (" +
			p.claimHalf("j.id", "?", set, conds, "?") + ") RETURNING " + jobColumnList
		args := append(append([]any{f.owner, lease, prio}, halfArgs(set, due, cargs)...), want)
		return p.queryJobs(db, q, args...)
	})
	if err != nil && len(jobs) > 0 {
		// Those are leased (committed): run them; the error shows again at
		// the next claim.
		return jobs, nil
	}
	return jobs, err
}

// claimWalkTx is the claimByWalkTx strategy: in one transaction, the
// locking reads of selectClaimable, then one UPDATE of the jobs read.
func (p *Plugin) claimWalkTx(ctx context.Context, f *claimFilter, now, lease time.Time) ([]*Job, error) {
	if m, ok := p.dialect.txns.(*mariaTxns); ok {
		return p.claimWalkBlocks(ctx, m, f, now, lease)
	}
	var jobs []*Job
	err := p.session(ctx).Transaction(func(tx *gorm.DB) error {
		if err := p.dialect.beginWrite(tx); err != nil {
			return err
		}
		var err error
		if jobs, err = p.selectClaimable(p.hotQueryOn(tx), f, now); err != nil || len(jobs) == 0 {
			return err
		}
		claimReadHook()
		q, args := leaseSQL(jobs, f.owner, lease)
		_, err = p.execHot(tx, q, args...)
		return err
	}, p.dialect.claimTxOptions())
	return jobs, err
}

// claimReadHook runs in a MySQL claim's transaction between its reads and
// its UPDATE (tests pause it there).
var claimReadHook = func() {}

// leaseSQL is the claim's UPDATE of the jobs it read, which it marks
// leased to owner until lease.
func leaseSQL(jobs []*Job, owner string, lease time.Time) (string, []any) {
	args := []any{owner, lease}
	for _, j := range jobs {
		args = append(args, j.ID)
		j.Attempts++
		j.LockedBy, j.LockedUntil = owner, &lease
	}
	return "UPDATE " + jobTable + " SET attempts = attempts + 1, locked_by = ?, locked_until = ? WHERE id IN (?" + strings.Repeat(", ?", len(jobs)-1) + ")", args
}

// runsBefore is the claim order: priority, then due scheduled jobs by
// (scheduled, id), then unscheduled jobs by id.
func runsBefore(a, b *Job) bool {
	switch {
	case a.Priority != b.Priority:
		return a.Priority > b.Priority
	case (a.Scheduled == nil) != (b.Scheduled == nil):
		return a.Scheduled != nil
	case a.Scheduled != nil && !a.Scheduled.Equal(*b.Scheduled):
		return a.Scheduled.Before(*b.Scheduled)
	}
	return a.ID < b.ID
}

// failExhausted ends failed the claimed jobs that had no attempt left, each
// only while the claim still holds it and it is still pending: between the
// claim's commit and this transaction another process may have cancelled it
// (Deschedule) or taken it for a run of its own (Job.Execute).
func (p *Plugin) failExhausted(ctx context.Context, ids []int64, owner string, now time.Time) error {
	return p.serialize(func() error {
		return retryDeadlock(ctx, func() error {
			return p.session(ctx).Transaction(func(tx *gorm.DB) error {
				var rows []JobError
				for _, id := range ids { // rare: one statement each tells which ended
					res := tx.Exec("UPDATE "+jobTable+" SET failed = ?, attempts = attempts - 1, locked_by = '', locked_until = NULL WHERE id = ? AND locked_by = ? AND "+stillPending,
						now, id, owner)
					if res.Error != nil {
						return res.Error
					}
					if res.RowsAffected == 1 {
						rows = append(rows, JobError{JobID: id, Executed: now,
							Exception: ErrAttemptsExhausted.Error() + ": the last run ended without a result (its worker stopped or lost the database)"})
					}
				}
				if len(rows) == 0 {
					return nil
				}
				if err := tx.Create(&rows).Error; err != nil {
					return err
				}
				for _, r := range rows {
					p.Logger.Error("async: job failed: attempts exhausted by lost runs", "job", r.JobID)
				}
				return nil
			})
		})
	})
}

// claimByID claims one job for Job.Execute, whatever its schedule.
func (p *Plugin) claimByID(ctx context.Context, id int64, owner string, lease time.Duration) (*Job, error) {
	var job Job
	err := p.serializeEntry(ctx, fmt.Sprintf("executing job %d", id), func() error {
		return retryDeadlock(ctx, func() error {
			return p.session(ctx).Transaction(func(tx *gorm.DB) error {
				now := p.now()
				res := tx.Exec("UPDATE "+jobTable+" SET attempts = attempts + 1, locked_by = ?, locked_until = ? WHERE id = ? AND "+pending(jobTable)+
					" AND (locked_until IS NULL OR locked_until < ?)", owner, now.Add(lease), id, now)
				if res.Error != nil {
					return res.Error
				}
				if res.RowsAffected == 0 {
					if tx.Model(&Job{}).Where("id = ?", id).Take(&job).Error != nil {
						return errorf(ErrJobNotFound, "job %d", id)
					}
					if job.state() == "is pending" && job.LockedUntil != nil {
						return errorf(ErrJobClaimed, "job %d is leased to %s until %s", id, job.LockedBy,
							job.LockedUntil.UTC().Format(time.RFC3339Nano))
					}
					return errorf(ErrNotPending, "job %d %s", id, job.state())
				}
				return tx.Where("id = ?", id).Take(&job).Error
			})
		})
	})
	if err != nil {
		return nil, err
	}
	return &job, nil
}

func (j *Job) state() string {
	switch {
	case j.Executed != nil:
		return "is executed"
	case j.Cancelled != nil:
		return "is cancelled"
	case j.Failed != nil:
		return "has failed"
	}
	return "is pending"
}
