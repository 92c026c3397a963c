package async

import (
	"sync/atomic"
	"time"
)

// runChain carries a worker slot's runs from one to the next: when a strict
// job commits on a connTxns connection and the slot has another job ready,
// the COMMIT travels with the next run's BEGIN and fence (one round trip
// instead of two), and the next run starts in that transaction.
type runChain struct {
	// take returns the slot's next ready batch, or nil at once if none.
	take func() []*Job
	// next is the batch taken at the last commit, and begun its run's
	// transaction (nil if it must begin afresh), with the rows its fence
	// affected and the time it was fenced at (the run's start).
	next     []*Job
	begun    *runTxn
	fenced   int64
	fencedAt time.Time
}

// chainedRuns counts runs begun by the previous run's commit (for tests).
var chainedRuns atomic.Int64

// pending returns the batch taken at the last commit, if any.
func (c *runChain) pending() []*Job {
	jobs := c.next
	c.next = nil
	return jobs
}

// drop rolls back a begun run that will not go on.
func (c *runChain) drop() {
	if c != nil && c.begun != nil {
		c.begun.rollback()
		c.begun = nil
	}
}
