package async

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
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

// The claim reads pending jobs one priority at a time. A read of all due
// jobs in run order over one index cannot stop after reading about as many
// entries as it returns: within a priority, the due scheduled jobs sit next
// to the ones scheduled for later (and, on MySQL, where NULLs sort first,
// behind the unscheduled ones), and no index range leaves those out while
// priority is unbound. So the claim walks the pending priorities downwards,
// each step one index descent (the highest pending priority below the last),
// and reads for each priority two exact ranges of async_job_pending: the due
// scheduled jobs, (priority, scheduled <= due) in (scheduled, id) order, then
// the unscheduled ones, (priority, scheduled IS NULL) in id order. It stops
// once it has enough jobs. It thus reads about as many index entries as it
// claims, however many jobs are pending or scheduled for later. What it
// still reads in passing: jobs claimed by others and not yet done, jobs of
// other queues (or names, or partitions) at the same priority, group final
// jobs still waiting, and one descent per pending priority above the last
// one it takes from.

// dueSet is one of the two halves of a priority's due jobs.
type dueSet int

const (
	dueScheduled   dueSet = iota // scheduled <= due, by (scheduled, id)
	dueUnscheduled               // scheduled IS NULL, by id
)

// dueTime is the time up to which scheduled jobs are due.
func (f *claimFilter) dueTime(now time.Time) time.Time {
	if f.dueBy.IsZero() {
		return now
	}
	return f.dueBy
}

// claimConds is the rest of the WHERE clause of every read of claimable jobs
// (alias j), after the pending, priority and schedule tests: the lease, the
// queues, the task name prefix, the partition, and a group's final job
// waiting for the rest of its group.
func (p *Plugin) claimConds(f *claimFilter, now time.Time) (string, []any) {
	var b strings.Builder
	b.WriteString(" AND (j.locked_until IS NULL OR j.locked_until < ?)")
	args := []any{now}
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
	return b.String(), args
}

// topPriority is the SQL of the highest pending priority, or with below
// (SQL of a priority) the highest one below it: one descent of
// async_job_pending.
func topPriority(below string) string {
	q := "SELECT t.priority FROM " + jobTable + " t WHERE " + pending("t")
	if below != "" {
		q += " AND t.priority < " + below
	}
	return q + " ORDER BY t.priority DESC LIMIT 1"
}

// claimHalf is a read of one half of the due jobs, at most ? of them, first
// in run order, row-locked where the dialect locks. prio is the SQL
// condition on j.priority (and, on SQLite, on the index's expression column
// scheduled IS NULL); order the ORDER BY list. Its arguments: for
// dueScheduled the due time, then those of conds, then the limit.
func (p *Plugin) claimHalf(cols, prio string, set dueSet, conds, order string) string {
	q := "SELECT " + cols + " FROM " + jobTable + " j WHERE " + pending("j") + " AND " + prio
	if set == dueScheduled {
		q += " AND j.scheduled <= ?"
	} else {
		q += " AND j.scheduled IS NULL"
	}
	return q + conds + " ORDER BY " + order + " LIMIT ?" + p.dialect.lockClause()
}

// halfArgs are claimHalf's arguments.
func halfArgs(set dueSet, due time.Time, cargs []any, limit int) []any {
	var args []any
	if set == dueScheduled {
		args = append(args, due)
	}
	args = append(args, cargs...)
	return append(args, limit)
}

// claimIDs is one statement selecting (and, on Postgres, row-locking) the
// ids of up to f.limit claimable jobs, the first ones in run order; the
// claim of Postgres and SQLite is UPDATE ... WHERE id IN (claimIDs)
// RETURNING.
//
// Postgres walks the priorities in a recursive CTE and reads each one's two
// halves in a LATERAL subquery. The nested loop yields jobs in run order
// and the outer LIMIT stops it, so that the recursion goes no further down
// than needed and exactly the jobs taken are locked (SKIP LOCKED passes
// over those that other claims hold). Both halves are ordered by
// (scheduled, id), which for the unscheduled ones (all NULL) is id order,
// so that the planner sees the index order serve them.
//
// SQLite has no LATERAL. It lists the pending priorities with the same
// recursion (one descent each) and reads each half over all of them with
// priority IN (...), which it serves from the index, in order, stopping at
// the limit; at most twice the limit jobs are then merged in run order.
// (scheduled IS NULL) = 0 or 1 binds the index's expression column. SQLite
// has no row locks: a claim holds the database's write lock.
func (p *Plugin) claimIDs(f *claimFilter, now time.Time) (string, []any) {
	conds, cargs := p.claimConds(f, now)
	due := f.dueTime(now)
	prios := "WITH RECURSIVE pr(p) AS (SELECT (" + topPriority("") + ") UNION ALL SELECT (" +
		topPriority("pr.p") + ") FROM pr WHERE pr.p IS NOT NULL) "
	args := append(halfArgs(dueScheduled, due, cargs, f.limit), halfArgs(dueUnscheduled, due, cargs, f.limit)...)
	args = append(args, f.limit)
	if p.dialect.kind == kindPostgres {
		const order = "j.scheduled, j.id"
		return prios + "SELECT c.id FROM pr CROSS JOIN LATERAL (SELECT * FROM (" +
			p.claimHalf("j.id", "j.priority = pr.p", dueScheduled, conds, order) + ") s UNION ALL SELECT * FROM (" +
			p.claimHalf("j.id", "j.priority = pr.p", dueUnscheduled, conds, order) + ") u) c WHERE pr.p IS NOT NULL LIMIT ?", args
	}
	const order = "j.priority DESC, j.scheduled, j.id"
	const in = "j.priority IN (SELECT p FROM pr) AND (j.scheduled IS NULL) = "
	return prios + "SELECT id FROM (SELECT * FROM (" +
		p.claimHalf("j.id, j.priority, 0 AS half, j.scheduled", in+"0", dueScheduled, conds, order) + ") UNION ALL SELECT * FROM (" +
		p.claimHalf("j.id, j.priority, 1 AS half, j.scheduled", in+"1", dueUnscheduled, conds, order) +
		")) ORDER BY priority DESC, half, scheduled, id LIMIT ?", args
}

// selectClaimable reads (and row-locks) up to f.limit claimable jobs in run
// order inside the claim transaction tx: where a claim cannot be one UPDATE
// ... RETURNING (MySQL, MariaDB; SQLite before 3.35).
//
// MySQL and MariaDB cannot serve claimIDs from an index (their range
// optimizer takes no priority from a subquery, and a recursive CTE there
// reads every pending row), so the claim walks the priorities itself: one
// descent for the next priority, then the two halves with the priority
// bound, each asking only for the jobs still missing, so that no job is
// locked that the claim does not take. Each read is an exact range of
// async_job_pending (executed, cancelled, failed, priority, scheduled, id)
// in index order, ascending within the priority, which servers that ignore
// DESC in an index serve as well.
func (p *Plugin) selectClaimable(tx *gorm.DB, f *claimFilter, now time.Time) ([]*Job, error) {
	if p.dialect.kind != kindMySQL {
		q, args := p.claimIDs(f, now)
		return p.queryJobs(tx, "SELECT * FROM "+jobTable+" WHERE id IN ("+q+")", args...)
	}
	conds, cargs := p.claimConds(f, now)
	due := f.dueTime(now)
	var jobs []*Job
	prio, ok, err := p.queryPriority(tx, topPriority(""))
	for ok && err == nil && len(jobs) < f.limit {
		for _, set := range []dueSet{dueScheduled, dueUnscheduled} {
			if len(jobs) == f.limit {
				break
			}
			// MySQL reads the unscheduled half as a ref lookup (IS NULL is an
			// equality there) and needs ORDER BY id to see the index order.
			order := "j.scheduled, j.id"
			if set == dueUnscheduled {
				order = "j.id"
			}
			q := p.claimHalf("j.*", "j.priority = ?", set, conds, order)
			part, err := p.queryJobs(tx, q, append([]any{prio}, halfArgs(set, due, cargs, f.limit-len(jobs))...)...)
			if err != nil {
				return nil, err
			}
			jobs = append(jobs, part...)
		}
		if len(jobs) < f.limit {
			prio, ok, err = p.queryPriority(tx, topPriority("?"), prio)
		}
	}
	return jobs, err
}

// queryPriority runs a query for one priority (topPriority) in tx; ok is
// false when it found none.
func (p *Plugin) queryPriority(tx *gorm.DB, q string, args ...any) (prio int, ok bool, err error) {
	ctx := tx.Statement.Context
	var rows *sql.Rows
	if s, stx := p.prepared(ctx, q), sqlTxOf(tx); s != nil && stx != nil {
		rows, err = stx.StmtContext(ctx, s).QueryContext(ctx, args...)
	} else {
		rows, err = tx.Raw(q, args...).Rows()
	}
	if err != nil {
		return 0, false, err
	}
	defer rows.Close()
	if rows.Next() {
		if err := rows.Scan(&prio); err != nil {
			return 0, false, err
		}
		ok = true
	}
	return prio, ok, rows.Err()
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
			jobs = jobs[:0]
			if p.dialect.updateReturning() {
				// One statement: UPDATE ... WHERE id IN (SELECT ... FOR UPDATE
				// SKIP LOCKED) RETURNING *.
				sel, args := p.claimIDs(f, now)
				args = append([]any{f.owner, lease}, args...)
				set := "UPDATE " + jobTable + " SET attempts = attempts + 1, locked_by = ?, locked_until = ?"
				if p.dialect.pipeline && p.sqlDB != nil {
					var err error
					jobs, err = pipeClaim(ctx, p.sqlDB, set+" WHERE id IN ("+sel+") RETURNING "+jobColumnList, args)
					return err
				}
				lazy, ret := p.dialect.lazyCommitFrom(), "*"
				if lazy != "" {
					ret = jobTable + ".*" // not the FROM item's column
				}
				q := set + lazy + " WHERE " + jobTable + ".id IN (" + sel + ") RETURNING " + ret
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
		return retryDeadlock(ctx, func() error {
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
	})
}

// claimByID claims one job for Job.Execute, whatever its schedule.
func (p *Plugin) claimByID(ctx context.Context, id int64, owner string, lease time.Duration) (*Job, error) {
	var job Job
	err := p.serialize(func() error {
		return retryDeadlock(ctx, func() error {
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

// deadlockRetries is how many times a claim's transaction is run again after
// the database chose it as a deadlock victim.
const deadlockRetries = 3

// retryDeadlock runs fn, a whole transaction (or a statement on its own),
// again when the database rolled it back to break a deadlock: nothing of it
// was committed, so running it again is safe. A job's run is never retried
// this way: its task has effects outside the database; a failed run is
// recorded and rescheduled instead.
func retryDeadlock(ctx context.Context, fn func() error) error {
	for i := 0; ; i++ {
		err := fn()
		if err == nil || i == deadlockRetries || !isDeadlock(err) {
			return err
		}
		t := time.NewTimer(time.Duration(1+mrand.IntN(4<<i)) * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
	}
}

// isDeadlock reports whether err is a deadlock that rolled the transaction
// back: SQLSTATE 40P01 on Postgres, error 1213 on MySQL and MariaDB. The
// MySQL driver's error is recognised by its text ("Error 1213 ..."), so
// that the plugin does not link the MySQL driver into programs that use
// another database.
func isDeadlock(err error) bool {
	var pg interface{ SQLState() string }
	if errors.As(err, &pg) && pg.SQLState() == "40P01" {
		return true
	}
	for e := err; e != nil; e = errors.Unwrap(e) {
		if msg := e.Error(); strings.HasPrefix(msg, "Error 1213 ") || strings.HasPrefix(msg, "Error 1213:") {
			return true
		}
	}
	return false
}
