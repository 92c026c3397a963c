package async

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
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

// Which due jobs a claim query selects: all of them in run order, or (where
// the server's indexes cannot serve that order, see dialect.splitClaim) only
// the due scheduled ones or only the unscheduled ones.
type dueSet int

const (
	dueAll dueSet = iota
	dueScheduled
	dueUnscheduled
)

// claimQuery builds the SELECT of claimable jobs in run order; cols is the
// select list.
func (p *Plugin) claimQuery(f *claimFilter, now time.Time, cols string, set dueSet) (string, []any) {
	var b strings.Builder
	dueBy := f.dueBy
	if dueBy.IsZero() {
		dueBy = now
	}
	var args []any
	b.WriteString("SELECT " + cols + " FROM " + jobTable + " j WHERE " + pending("j"))
	order := p.dialect.claimOrder()
	switch set {
	case dueAll:
		b.WriteString(" AND (j.scheduled IS NULL OR j.scheduled <= ?)")
		args = append(args, dueBy)
	case dueScheduled:
		b.WriteString(" AND j.scheduled <= ?")
		args = append(args, dueBy)
		order = "j.priority DESC, j.scheduled, j.id"
	case dueUnscheduled:
		b.WriteString(" AND j.scheduled IS NULL")
		order = "j.priority DESC, j.id"
	}
	b.WriteString(" AND (j.locked_until IS NULL OR j.locked_until < ?)")
	args = append(args, now)
	if len(f.queues) > 0 {
		b.WriteString(" AND j.queue IN (?" + strings.Repeat(", ?", len(f.queues)-1) + ")")
		for _, q := range f.queues {
			args = append(args, q)
		}
	}
	if f.prefix != "" {
		cond, arg := p.dialect.namePrefix("j.name", f.prefix)
		b.WriteString(" AND " + cond)
		args = append(args, arg)
	}
	if f.outOf > 1 {
		b.WriteString(" AND j.id % ? = ?")
		args = append(args, f.outOf, ((f.which%f.outOf)+f.outOf)%f.outOf)
	}
	// A group's final job waits until every other job of its group is done.
	b.WriteString(" AND (j.group_id IS NULL OR NOT EXISTS (SELECT 1 FROM " + groupTable + " g JOIN " + jobTable +
		" o ON o.group_id = g.id WHERE g.id = j.group_id AND g.final_id = j.id AND o.id <> j.id AND " + pending("o") + "))")
	b.WriteString(" ORDER BY " + order + " LIMIT ?")
	args = append(args, f.limit)
	b.WriteString(p.dialect.lockClause())
	return b.String(), args
}

// selectClaimable reads (and row-locks) up to f.limit claimable jobs in run
// order inside the claim transaction tx.
func (p *Plugin) selectClaimable(tx *gorm.DB, f *claimFilter, now time.Time) ([]*Job, error) {
	if !p.dialect.splitClaim() {
		q, args := p.claimQuery(f, now, "j.*", dueAll)
		return p.queryJobs(tx, q, args...)
	}
	// Two index-ordered reads instead of one sort of every pending job.
	var jobs []*Job
	for _, set := range []dueSet{dueScheduled, dueUnscheduled} {
		q, args := p.claimQuery(f, now, "j.*", set)
		part, err := p.queryJobs(tx, q, args...)
		if err != nil {
			return nil, err
		}
		jobs = append(jobs, part...)
	}
	sort.Slice(jobs, func(a, b int) bool { return runsBefore(jobs[a], jobs[b]) })
	return jobs[:min(len(jobs), f.limit)], nil
}

// claim takes up to f.limit runnable jobs for f.owner, in run order. Jobs
// whose attempts ran out without a recorded result (their workers died) end
// failed here instead.
func (p *Plugin) claim(ctx context.Context, f *claimFilter) ([]*Job, error) {
	var jobs []*Job
	now := p.now()
	lease := now.Add(f.lease)
	err := p.serialize(func() error {
		jobs = jobs[:0]
		if p.dialect.updateReturning() {
			// One statement: UPDATE ... WHERE id IN (SELECT ... FOR UPDATE
			// SKIP LOCKED) RETURNING *.
			sel, args := p.claimQuery(f, now, "j.id", dueAll)
			lazy, ret := p.dialect.lazyCommitFrom(), "*"
			if lazy != "" {
				ret = jobTable + ".*" // not the FROM item's column
			}
			q := "UPDATE " + jobTable + " SET attempts = attempts + 1, locked_by = ?, locked_until = ?" + lazy +
				" WHERE " + jobTable + ".id IN (" + sel + ") RETURNING " + ret
			args = append([]any{f.owner, lease}, args...)
			var err error
			jobs, err = p.queryJobs(p.session(ctx), q, args...)
			return err
		}
		return p.session(ctx).Transaction(func(tx *gorm.DB) error {
			if err := p.dialect.beginWrite(tx); err != nil {
				return err
			}
			var err error
			if jobs, err = p.selectClaimable(tx, f, now); err != nil || len(jobs) == 0 {
				return err
			}
			ids := make([]int64, len(jobs))
			for i, j := range jobs {
				ids[i] = j.ID
				j.Attempts++
				j.LockedBy, j.LockedUntil = f.owner, &lease
			}
			q := "UPDATE " + jobTable + " SET attempts = attempts + 1, locked_by = ?, locked_until = ? WHERE id IN (?" + strings.Repeat(", ?", len(ids)-1) + ")"
			args := []any{f.owner, lease}
			for _, id := range ids {
				args = append(args, id)
			}
			_, err = p.execHot(tx, q, args...)
			return err
		}, p.dialect.claimTxOptions())
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
			return nil, fmt.Errorf("async: failing exhausted jobs: %w", err)
		}
		if len(claimed) == 0 {
			return p.claim(ctx, f) // those are out of the way: look again
		}
	}
	sort.Slice(claimed, func(a, b int) bool { return runsBefore(claimed[a], claimed[b]) })
	return claimed, nil
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

// failExhausted ends failed the claimed jobs that had no attempt left.
func (p *Plugin) failExhausted(ctx context.Context, ids []int64, owner string, now time.Time) error {
	return p.serialize(func() error {
		return p.session(ctx).Transaction(func(tx *gorm.DB) error {
			if err := tx.Exec("UPDATE "+jobTable+" SET failed = ?, attempts = attempts - 1, locked_by = '', locked_until = NULL WHERE id IN ? AND locked_by = ?",
				now, ids, owner).Error; err != nil {
				return err
			}
			rows := make([]JobError, len(ids))
			for i, id := range ids {
				rows[i] = JobError{JobID: id, Executed: now,
					Exception: ErrAttemptsExhausted.Error() + ": the last run ended without a result (its worker stopped or lost the database)"}
				p.Logger.Error("async: job failed: attempts exhausted by lost runs", "job", id)
			}
			return tx.Create(&rows).Error
		})
	})
}

// claimByID claims one job for Job.Execute, whatever its schedule.
func (p *Plugin) claimByID(ctx context.Context, id int64, owner string, lease time.Duration) (*Job, error) {
	var job Job
	err := p.serialize(func() error {
		return p.session(ctx).Transaction(func(tx *gorm.DB) error {
			now := p.now()
			res := tx.Exec("UPDATE "+jobTable+" SET attempts = attempts + 1, locked_by = ?, locked_until = ? WHERE id = ? AND "+pending(jobTable),
				owner, now.Add(lease), id)
			if res.Error != nil {
				return res.Error
			}
			if res.RowsAffected == 0 {
				if tx.Model(&Job{}).Where("id = ?", id).Take(&job).Error != nil {
					return errorf(ErrJobNotFound, "job %d", id)
				}
				return errorf(ErrNotPending, "job %d %s", id, job.state())
			}
			return tx.Where("id = ?", id).Take(&job).Error
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
