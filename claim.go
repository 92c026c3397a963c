package async

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"sort"
	"strconv"
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

// priorityProbe is the SQL of the highest pending priority (below ?, with
// below), one descent of async_job_pending. On SQLite it also tells whether
// that priority has due scheduled jobs (one more descent, arguments: the due
// time first), so that the claim skips that half's statement when it has
// none; MySQL would read that subquery by reference to the priority, through
// every unscheduled job of it.
func (p *Plugin) priorityProbe(below bool) string {
	q := "SELECT t.priority"
	if p.dialect.kind == kindSQLite {
		q += ", EXISTS (SELECT 1 FROM " + jobTable + " d WHERE " + pending("d") +
			" AND d.priority = t.priority AND (d.scheduled IS NULL) = 0 AND d.scheduled <= ?)"
	}
	q += " FROM " + jobTable + " t WHERE " + pending("t")
	if below {
		q += " AND t.priority < ?"
	}
	return q + " ORDER BY t.priority DESC LIMIT 1"
}

// claimHalf is a read of one half of a priority's due jobs, at most limit
// of them (SQL: a number or a placeholder), first in run order, row-locked
// where the dialect locks. prio is the SQL of the priority (a placeholder
// or a column). Its arguments: the priority if a placeholder, for
// dueScheduled the due time, then those of conds, then the limit if a
// placeholder.
func (p *Plugin) claimHalf(cols, prio string, set dueSet, conds, limit string) string {
	q := "SELECT " + cols + " FROM " + jobTable + " j WHERE " + pending("j") + " AND j.priority = " + prio
	// Both halves are ordered by (scheduled, id): for the unscheduled ones
	// (all NULL) that is id order, and Postgres and SQLite then see the
	// index serve it. MySQL reads the unscheduled half as a lookup of
	// scheduled IS NULL (an equality there) and needs ORDER BY id instead.
	order := "j.scheduled, j.id"
	switch {
	case set == dueScheduled && p.dialect.kind == kindSQLite:
		// The index's expression column (scheduled IS NULL) must be bound
		// for SQLite to reach the scheduled column's range.
		q += " AND (j.scheduled IS NULL) = 0 AND j.scheduled <= ?"
	case set == dueScheduled:
		q += " AND j.scheduled <= ?"
	case p.dialect.kind == kindSQLite:
		q += " AND (j.scheduled IS NULL) = 1 AND j.scheduled IS NULL"
	case p.dialect.kind == kindMySQL:
		q += " AND j.scheduled IS NULL"
		order = "j.id"
	default:
		q += " AND j.scheduled IS NULL"
	}
	return q + conds + " ORDER BY " + order + " LIMIT " + limit + p.dialect.lockClause()
}

// halfArgs are claimHalf's arguments between the priority and the limit.
func halfArgs(set dueSet, due time.Time, cargs []any) []any {
	var args []any
	if set == dueScheduled {
		args = append(args, due)
	}
	return append(args, cargs...)
}

// claimIDs is the Postgres claim's SELECT of (and row locks on) the ids of
// up to f.limit claimable jobs, the first in run order: its claim is the one
// statement UPDATE ... WHERE id IN (claimIDs) RETURNING. A recursive CTE
// walks the pending priorities, and a LATERAL subquery reads each one's two
// halves. The nested loop yields jobs in run order and the outer LIMIT stops
// it, so that the walk goes no further down than needed and exactly the
// jobs taken are locked (SKIP LOCKED passes over those that other claims
// hold).
//
// The limits are literals: with LIMIT $n the planner cannot cost a generic
// plan (it guesses a tenth of the rows) and plans every execution anew (a
// quarter of a millisecond for this statement); with literal limits the
// prepared statement (pgx keeps one per connection and text) runs its
// generic plan from the sixth execution on. A worker uses a few limits, one
// per number of free slots.
func (p *Plugin) claimIDs(f *claimFilter, now time.Time) (string, []any) {
	conds, cargs := p.claimConds(f, now)
	due := f.dueTime(now)
	limit := strconv.Itoa(f.limit)
	walk := "WITH RECURSIVE pr(p) AS (SELECT (SELECT t.priority FROM " + jobTable + " t WHERE " + pending("t") +
		" ORDER BY t.priority DESC LIMIT 1) UNION ALL SELECT (SELECT t.priority FROM " + jobTable + " t WHERE " + pending("t") +
		" AND t.priority < pr.p ORDER BY t.priority DESC LIMIT 1) FROM pr WHERE pr.p IS NOT NULL) "
	return walk + "SELECT c.id FROM pr CROSS JOIN LATERAL (SELECT * FROM (" +
			p.claimHalf("j.id", "pr.p", dueScheduled, conds, limit) + ") s UNION ALL SELECT * FROM (" +
			p.claimHalf("j.id", "pr.p", dueUnscheduled, conds, limit) + ") u) c WHERE pr.p IS NOT NULL LIMIT " + limit,
		append(halfArgs(dueScheduled, due, cargs), halfArgs(dueUnscheduled, due, cargs)...)
}

// walkClaim is the claim of MySQL, MariaDB and SQLite: it walks the pending
// priorities itself, from the highest down, one probe (priorityProbe) each,
// and calls take for each half of a priority's due jobs with the number of
// jobs still wanted, until it has f.limit jobs or no priority is left.
//
// MySQL and MariaDB cannot serve claimIDs from an index (their range
// optimizer takes no priority from a subquery, and a recursive CTE there
// reads every pending row). SQLite could, but the pure-Go driver compiles
// every statement on every execution, and a few short statements cost less
// than claimIDs' one.
func (p *Plugin) walkClaim(db *gorm.DB, f *claimFilter, now time.Time, take func(prio int, set dueSet, want int) ([]*Job, error)) ([]*Job, error) {
	due := f.dueTime(now)
	var jobs []*Job
	probe := func(below ...any) (prio int, hasDue, ok bool, err error) {
		var args []any
		if p.dialect.kind == kindSQLite {
			args = append(args, due)
		}
		q := p.priorityProbe(len(below) > 0)
		args = append(args, below...)
		// Straight to database/sql (queryHot): GORM's statement building
		// costs as much as SQLite's running this.
		rows, err := p.queryHot(db, q, args...)
		if err != nil {
			return 0, false, false, err
		}
		defer rows.Close()
		hasDue = true // MySQL: unknown, look
		if rows.Next() {
			dest := []any{&prio}
			if p.dialect.kind == kindSQLite {
				dest = append(dest, &hasDue)
			}
			if err := rows.Scan(dest...); err != nil {
				return 0, false, false, err
			}
			ok = true
		}
		return prio, hasDue, ok, rows.Err()
	}
	prio, hasDue, ok, err := probe()
	for ok && err == nil && len(jobs) < f.limit {
		for _, set := range []dueSet{dueScheduled, dueUnscheduled} {
			if len(jobs) == f.limit || set == dueScheduled && !hasDue {
				continue
			}
			part, err := take(prio, set, f.limit-len(jobs))
			if err != nil {
				return jobs, err
			}
			jobs = append(jobs, part...)
		}
		if len(jobs) < f.limit {
			prio, hasDue, ok, err = probe(prio)
		}
	}
	return jobs, err
}

// selectClaimable reads (and row-locks) up to f.limit claimable jobs in run
// order inside the claim transaction tx: the claim of MySQL and MariaDB
// (and of SQLite before 3.35, which has no RETURNING). Each half asks only
// for the jobs still missing and is an exact range of async_job_pending
// (executed, cancelled, failed, priority, scheduled, id), read in index
// order, ascending within the priority, which servers that ignore DESC in
// an index serve as well. So a MySQL claim locks the jobs it takes and
// besides only rows it passes over that another claim or run holds (SKIP
// LOCKED: InnoDB keeps its lock on their index entry until the claim
// commits) and, when a read runs to the end of its range, the index entry
// past the end, whose lock InnoDB keeps too. It used to lock every pending
// row its first read passed over, which made completions wait for claims
// and deadlock with them.
func (p *Plugin) selectClaimable(tx *gorm.DB, f *claimFilter, now time.Time) ([]*Job, error) {
	conds, cargs := p.claimConds(f, now)
	due := f.dueTime(now)
	return p.walkClaim(tx, f, now, func(prio int, set dueSet, want int) ([]*Job, error) {
		args := append(append([]any{prio}, halfArgs(set, due, cargs)...), want)
		return p.queryJobs(tx, p.claimHalf("j.*", "?", set, conds, "?"), args...)
	})
}

// claimSQLite is the claim of SQLite: walkClaim, each half taken by one
// UPDATE ... WHERE id IN (half) RETURNING, which re-reads the half at the
// database's write lock, so that the claim needs no transaction of its own.
func (p *Plugin) claimSQLite(db *gorm.DB, f *claimFilter, now, lease time.Time) ([]*Job, error) {
	conds, cargs := p.claimConds(f, now)
	due := f.dueTime(now)
	jobs, err := p.walkClaim(db, f, now, func(prio int, set dueSet, want int) ([]*Job, error) {
		q := "UPDATE " + jobTable + " SET attempts = attempts + 1, locked_by = ?, locked_until = ? WHERE id IN (" +
			p.claimHalf("j.id", "?", set, conds, "?") + ") RETURNING *"
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
			switch {
			case p.dialect.kind == kindPostgres:
				// One statement: UPDATE ... WHERE id IN (SELECT ... FOR
				// UPDATE SKIP LOCKED) RETURNING *.
				sel, args := p.claimIDs(f, now)
				set := "UPDATE " + jobTable + " SET attempts = attempts + 1, locked_by = ?, locked_until = ?"
				if p.dialect.pipeline && p.sqlDB != nil {
					var err error
					jobs, err = pipeClaim(ctx, p.sqlDB, set+" WHERE id IN ("+sel+") RETURNING "+jobColumnList, append([]any{f.owner, lease}, args...))
					return err
				}
				q := set + p.dialect.lazyCommitFrom() + " WHERE " + jobTable + ".id IN (" + sel + ") RETURNING " + jobTable + ".*" // not the FROM item's column
				var err error
				jobs, err = p.queryJobs(p.session(ctx), q, append([]any{f.owner, lease}, args...)...)
				return err
			case p.dialect.kind == kindSQLite && p.dialect.updateReturning():
				var err error
				jobs, err = p.claimSQLite(p.session(ctx), f, now, lease)
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
