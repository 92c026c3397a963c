package async

// The claim's database differences (claim.go, claim_walk.go): which way a
// claim takes its jobs, what the priority probe tells, and how each half of
// a priority's due jobs is tested and ordered so that async_job_pending
// serves it in run order.

// claimStrategy is the way a claim takes (reads and leases) its jobs.
type claimStrategy int

const (
	// claimByOneUpdate is one UPDATE ... WHERE id IN (claimIDs) RETURNING,
	// sent by pipeClaim where the pgx pipeline is in use (claimOneUpdate).
	claimByOneUpdate claimStrategy = iota + 1
	// claimByHalfUpdates is walkClaim with each half of a priority taken by
	// a short UPDATE ... WHERE id IN (claimHalf) RETURNING, with no
	// transaction of its own (claimHalfUpdates).
	claimByHalfUpdates
	// claimByWalkTx is walkClaim's locking reads (selectClaimable), then one
	// UPDATE of the jobs read, in a transaction (claimWalkTx).
	claimByWalkTx
)

// claimStrategy is the claim's strategy. Postgres claims in one statement,
// whose recursive CTE walks the priorities (claimIDs); the others walk them
// in Go (walkClaim says why). SQLite from 3.35 then takes each half with an
// UPDATE ... RETURNING; MySQL and MariaDB, which cannot return rows from an
// UPDATE, and older SQLite update the jobs read in a transaction.
func (d *dialect) claimStrategy() claimStrategy {
	switch {
	case d.kind == kindPostgres:
		return claimByOneUpdate
	case d.kind == kindSQLite && d.updateReturning():
		return claimByHalfUpdates
	}
	return claimByWalkTx
}

// probesDue reports whether the priority probe (priorityProbe) also tells
// whether the priority has due scheduled jobs, taking the due time as its
// first argument and returning a second column: on SQLite, where that costs
// one more index descent and saves a statement. MySQL would read that
// subquery by reference to the priority, through every unscheduled job of
// it.
func (d *dialect) probesDue() bool { return d.kind == kindSQLite }

// dueCond is the schedule test of one half of a priority's due jobs in the
// table aliased a, to be appended to its WHERE clause (it starts with " AND
// "). For dueScheduled its one argument is the due time.
func (d *dialect) dueCond(a string, set dueSet) string {
	switch {
	case set == dueScheduled && d.kind == kindSQLite:
		// The index's expression column (scheduled IS NULL) must be bound
		// for SQLite to reach the scheduled column's range.
		return " AND (" + a + ".scheduled IS NULL) = 0 AND " + a + ".scheduled <= ?"
	case set == dueScheduled:
		return " AND " + a + ".scheduled <= ?"
	case d.kind == kindSQLite:
		return " AND (" + a + ".scheduled IS NULL) = 1 AND " + a + ".scheduled IS NULL"
	}
	return " AND " + a + ".scheduled IS NULL"
}

// dueOrder is the ORDER BY list of one half of a priority's due jobs in the
// table aliased a: run order, as async_job_pending serves it. Both halves
// are ordered by (scheduled, id): for the unscheduled ones (all NULL) that
// is id order, and Postgres and SQLite then see the index serve it. MySQL
// reads the unscheduled half as a lookup of scheduled IS NULL (an equality
// there) and needs ORDER BY id instead.
func (d *dialect) dueOrder(a string, set dueSet) string {
	if set == dueUnscheduled && d.kind == kindMySQL {
		return a + ".id"
	}
	return a + ".scheduled, " + a + ".id"
}

// claimHints reports whether claims start their reads at the process's
// claim hints (claim_hint.go): on InnoDB, whose finished jobs' index
// entries stay at the head of the pending range until purge removes them.
func (d *dialect) claimHints() bool { return d.kind == kindMySQL }

// pendingIndexHint names async_job_pending for a claim's read above a
// claim hint (selectClaimable says why) on MySQL and MariaDB.
func (d *dialect) pendingIndexHint() string {
	if d.kind == kindMySQL {
		return " FORCE INDEX (async_job_pending)"
	}
	return ""
}
