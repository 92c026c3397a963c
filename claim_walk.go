package async

import (
	"strconv"
	"strings"
	"time"
)

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

// priorityProbe is the SQL of the highest pending priority, one descent of
// async_job_pending: of all of them (cmp ""), or only of those below (cmp
// "<") or above (cmp ">") the priority given as its last argument. Where the
// dialect probesDue it also tells whether that priority has due scheduled
// jobs (one more descent, arguments: the due time first), so that the claim
// skips that half's statement when it has none.
func (p *Plugin) priorityProbe(cmp string) string {
	q := "SELECT t.priority"
	if p.dialect.probesDue() {
		q += ", EXISTS (SELECT 1 FROM " + jobTable + " d WHERE " + pending("d") +
			" AND d.priority = t.priority" + p.dialect.dueCond("d", dueScheduled) + ")"
	}
	q += " FROM " + jobTable + " t WHERE " + pending("t")
	if cmp != "" {
		q += " AND t.priority " + cmp + " ?"
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
	return p.claimHalfFrom(jobTable+" j", cols, prio, set, conds, limit)
}

// claimHalfFrom is claimHalf reading from the table expression from (which
// names async_job j, with an index hint perhaps).
func (p *Plugin) claimHalfFrom(from, cols, prio string, set dueSet, conds, limit string) string {
	return "SELECT " + cols + " FROM " + from + " WHERE " + pending("j") + " AND j.priority = " + prio +
		p.dialect.dueCond("j", set) + conds + " ORDER BY " + p.dialect.dueOrder("j", set) + " LIMIT " + limit + p.dialect.lockClause()
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
// hint, if not "", names the filter whose top-priority hint the walk starts
// from and keeps (claim_hint.go).
//
// MySQL and MariaDB cannot serve claimIDs from an index (their range
// optimizer takes no priority from a subquery, and a recursive CTE there
// reads every pending row). SQLite could; its short statements were chosen
// when its driver compiled every statement on every execution, and they stay
// cheap now that they are prepared once per connection.
func (p *Plugin) walkClaim(query hotQuery, f *claimFilter, now time.Time, hint string, take func(prio int, set dueSet, want int) ([]*Job, error)) ([]*Job, error) {
	due := f.dueTime(now)
	var jobs []*Job
	probe := func(cmp string, than ...any) (prio int, hasDue, ok bool, err error) {
		var args []any
		if p.dialect.probesDue() {
			args = append(args, due)
		}
		q := p.priorityProbe(cmp)
		args = append(args, than...)
		// Straight to database/sql (queryHot): GORM's statement building
		// costs as much as SQLite's running this.
		rows, err := query(q, args...)
		if err != nil {
			return 0, false, false, err
		}
		defer rows.Close()
		hasDue = true // the probe does not tell: look
		if rows.Next() {
			dest := []any{&prio}
			if p.dialect.probesDue() {
				dest = append(dest, &hasDue)
			}
			if err := rows.Scan(dest...); err != nil {
				return 0, false, false, err
			}
			ok = true
		}
		return prio, hasDue, ok, rows.Err()
	}
	// With a hint, the top priority is the hinted one unless a higher one
	// has pending jobs: that probe starts above the hinted priority's
	// entries, where the full probe would read past its finished jobs'
	// entries not yet purged (claim_hint.go).
	var prio int
	var hasDue, ok, hinted bool
	var err error
	top, found := 0, false
	if hint != "" {
		top, found = p.hints.top(hint)
	}
	if found {
		prio, hasDue, ok, err = probe(">", top)
		if err == nil && !ok {
			prio, hasDue, ok, hinted = top, true, true, true
		}
	} else {
		prio, hasDue, ok, err = probe("")
	}
	if ok && err == nil && hint != "" {
		p.hints.setTop(hint, prio)
	}
	for ok && err == nil && len(jobs) < f.limit {
		took := 0
		for _, set := range []dueSet{dueScheduled, dueUnscheduled} {
			if len(jobs) == f.limit || set == dueScheduled && !hasDue {
				continue
			}
			part, err := take(prio, set, f.limit-len(jobs))
			if err != nil {
				return jobs, err
			}
			jobs = append(jobs, part...)
			took += len(part)
		}
		if hinted && took == 0 {
			p.hints.dropTop(hint) // it may have no pending job left
		}
		hinted = false
		if len(jobs) < f.limit {
			prio, hasDue, ok, err = probe("<", prio)
		}
	}
	return jobs, err
}

// selectClaimable reads (and row-locks) up to f.limit claimable jobs in run
// order inside the claim transaction that query runs in: the claim of MySQL and MariaDB
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
func (p *Plugin) selectClaimable(query hotQuery, f *claimFilter, now time.Time) ([]*Job, error) {
	conds, cargs := p.claimConds(f, now)
	due := f.dueTime(now)
	// read reads one half, above or below a hint's bound if given. A read
	// above the bound names the index: left to choose, MySQL and MariaDB
	// read the half as a lookup of its equality prefix (pending, priority,
	// scheduled IS NULL) and test the bound on every entry from the head of
	// that prefix, the very entries the hint is for passing by.
	read := func(prio int, set dueSet, bound string, barg any, above bool, want int) ([]*Job, error) {
		from, c, a := jobTable+" j", conds, cargs
		if bound != "" {
			c, a = bound+conds, append([]any{barg}, cargs...)
		}
		if above {
			from += p.dialect.pendingIndexHint()
		}
		args := append(append([]any{prio}, halfArgs(set, due, a)...), want)
		return scanJobs(query(p.claimHalfFrom(from, jobColumnsJ, "?", set, c, "?"), args...))
	}
	if !p.dialect.claimHints() {
		return p.walkClaim(query, f, now, "", func(prio int, set dueSet, want int) ([]*Job, error) {
			return read(prio, set, "", nil, false, want)
		})
	}
	name := f.hintName()
	return p.walkClaim(query, f, now, name, func(prio int, set dueSet, want int) ([]*Job, error) {
		k := hintKey{filter: name, prio: prio, set: set}
		h, ok := p.hints.get(k)
		if !ok {
			jobs, err := read(prio, set, "", nil, false, want)
			return jobs, p.hints.after(k, jobs, true, err)
		}
		cond, arg := hintCond(set, h, false)
		jobs, err := read(prio, set, cond, arg, true, want)
		if err != nil || len(jobs) == want {
			return jobs, p.hints.after(k, jobs, false, err)
		}
		// Short: read below the hint too, so that the range is read whole.
		cond, arg = hintCond(set, h, true)
		under, err := read(prio, set, cond, arg, false, want-len(jobs))
		jobs = append(under, jobs...)
		return jobs, p.hints.after(k, jobs, true, err)
	})
}
