package async

import (
	"fmt"

	"gorm.io/gorm"
)

// Deschedule cancels every pending job of the same identity as the job that
// Schedule(tx, task, opts...) would add: same task name, same positional
// arguments (Args) and same keyword arguments (WithKwargs), in any order.
// Other options (RunAfter, Priority, Queue, InGroup, Meta, MaxAttempts) are
// ignored. It sets cancelled to now on each of those jobs, through tx: inside
// a transaction, the cancellation takes effect only if that transaction
// commits. It returns how many jobs it cancelled.
//
// Only pending jobs are touched: jobs already executed, cancelled or failed
// keep their timestamps. A job that is running cannot be cancelled, as in the
// reference: its row is locked by its own transaction, and Deschedule skips
// it rather than wait for it (FOR UPDATE SKIP LOCKED), so it completes
// normally. On a server without SKIP LOCKED, and on SQLite (one writer at a
// time), Deschedule waits until such a run has ended instead, and cancels
// the job only if it is still pending then (its run failed and it waits for
// a retry). A job claimed but not yet started is cancelled, and its run is
// skipped.
func Deschedule(tx *gorm.DB, task any, opts ...Option) (int64, error) {
	p, err := pluginOf(tx)
	if err != nil {
		return 0, err
	}
	job, err := p.identityJob(task, opts)
	if err != nil {
		return 0, err // already "async: ..." and wrapping its sentinel, as from Schedule
	}
	if tx.Error != nil {
		return 0, fmt.Errorf("async: deschedule %s: the handle already carries an error: %w", job.String(), tx.Error)
	}
	db := tx.Session(&gorm.Session{NewDB: true})
	var n int64
	work := func(db *gorm.DB) error {
		var e error
		n, e = p.cancelIdentity(db, job.Identity)
		return e
	}
	if _, inTx := db.Statement.ConnPool.(gorm.TxCommitter); inTx {
		err = work(db)
	} else {
		// A plain handle: lock and update in one short transaction of our own.
		err = p.serialize(func() error {
			return db.Transaction(func(t *gorm.DB) error {
				if e := p.dialect.beginWrite(t); e != nil {
					return e
				}
				return work(t)
			})
		})
	}
	if err != nil {
		return 0, fmt.Errorf("async: deschedule %s: %w", job.String(), err)
	}
	p.Logger.Info("async: descheduled", "task", job.String(), "identity", job.Identity, "cancelled", n)
	return n, nil
}

// identityJob builds the job Schedule would insert for task with only the
// arguments of opts, so that its identity is computed exactly as Schedule does.
func (p *Plugin) identityJob(task any, opts []Option) (*newJobRow, error) {
	var spec jobSpec
	for _, o := range opts {
		if o != nil {
			o(&spec)
		}
	}
	return p.newJob(task, []Option{Args(spec.args...), WithKwargs(spec.kwargs)})
}

// cancelIdentity sets cancelled on the pending jobs with this identity whose
// rows are not locked by a running job, and returns how many it changed.
func (p *Plugin) cancelIdentity(db *gorm.DB, identity string) (int64, error) {
	var ids []int64
	err := db.Raw("SELECT id FROM "+jobTable+" WHERE identity = ? AND "+pending(jobTable)+" ORDER BY id"+p.dialect.lockClause(), identity).
		Scan(&ids).Error
	if err != nil {
		return 0, err
	}
	now := p.now()
	var n int64
	for start := 0; start < len(ids); start += 500 {
		chunk := ids[start:min(start+500, len(ids))]
		res := db.Exec("UPDATE "+jobTable+" SET cancelled = ? WHERE id IN ? AND "+pending(jobTable), now, chunk)
		if res.Error != nil {
			return 0, res.Error
		}
		n += res.RowsAffected
	}
	return n, nil
}
