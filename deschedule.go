package async

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

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
// normally. A row locked by a worker's claim under way (the claim taking it
// or, on MySQL, reading past it) is not taken for a running one: Deschedule
// reads it again for up to 250 ms, until the claim has committed, and then
// cancels the job. On a server without
// SKIP LOCKED, and on SQLite (one writer at a time), Deschedule waits until a
// run has ended instead, and cancels the job only if it is still pending
// then (its run failed and it waits for a retry). A job claimed but not yet
// started is cancelled, and its run is skipped; with group commit, whose
// batches do not lock their rows, a job cancelled while its batch runs may
// still have its task called, but its writes never commit and it stays
// cancelled.
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
	if inTransaction(db) {
		// Its locking read comes before its write: on SQLite take the
		// write lock first (writeTx), or the write fails at once while
		// another connection holds it.
		if err = p.dialect.beginWrite(db); err == nil {
			err = work(db)
		}
	} else {
		// A plain handle: lock and update in one short transaction of our own.
		err = p.serializeEntry(ctxOf(db), "deschedule "+job.String(), func() error { return p.writeTx(db, work) })
	}
	if errors.Is(err, ErrWriterBusy) {
		return 0, err // says what waited
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
	if p.dialect.skipLocked {
		held, err := p.lockClaimed(db, identity, ids)
		if err != nil {
			return 0, err
		}
		ids = append(ids, held...)
	}
	now := p.now()
	var n int64
	for chunk := range slices.Chunk(ids, idChunk) {
		res := db.Exec("UPDATE "+jobTable+" SET cancelled = ? WHERE id IN ? AND "+pending(jobTable), now, chunk)
		if res.Error != nil {
			return 0, res.Error
		}
		n += res.RowsAffected
	}
	return n, nil
}

// lockClaimed locks the pending jobs of identity that the SKIP LOCKED read
// passed over (they are not in got) though no run holds them: a job that
// runs has a lease, so a locked row without one is held by a claim under
// way, which commits in a moment. It reads them again with SKIP LOCKED
// (never waiting, so that two Deschedules of one identity cannot deadlock)
// at growing intervals for up to claimWait, and returns the ids it locked
// that are still pending. What stays locked that long is taken to be
// running: a job that started right after its claim, or whose run outlived
// its lease.
func (p *Plugin) lockClaimed(db *gorm.DB, identity string, got []int64) ([]int64, error) {
	var rows []struct {
		ID          int64
		LockedBy    string
		LockedUntil *time.Time
	}
	err := db.Raw("SELECT id, locked_by, locked_until FROM "+jobTable+" WHERE identity = ? AND "+pending(jobTable), identity).
		Scan(&rows).Error
	if err != nil || len(rows) == len(got) {
		return nil, err
	}
	seen := make(map[int64]bool, len(got))
	for _, id := range got {
		seen[id] = true
	}
	now := p.now()
	wait := map[int64]bool{}
	for _, r := range rows {
		if !seen[r.ID] && (r.LockedBy == "" || r.LockedUntil == nil || !r.LockedUntil.After(now)) {
			wait[r.ID] = true
		}
	}
	var held []int64
	ctx := db.Statement.Context
	deadline := time.Now().Add(claimWait)
	for pause := time.Millisecond; len(wait) > 0; pause *= 2 {
		descheduleWaitHook()
		select {
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		case <-time.After(min(pause, time.Until(deadline))):
		}
		for chunk := range slices.Chunk(slices.Collect(maps.Keys(wait)), idChunk) {
			var locked []int64
			err := db.Raw("SELECT id FROM "+jobTable+" WHERE id IN ? AND "+pending(jobTable)+" ORDER BY id"+p.dialect.lockClause(), chunk).
				Scan(&locked).Error
			if err != nil {
				return nil, err
			}
			held = append(held, locked...)
			for _, id := range locked {
				delete(wait, id)
			}
		}
		if !time.Now().Before(deadline) {
			break
		}
	}
	return held, nil
}

// claimWait is how long Deschedule waits for a claim under way to let go of
// a pending job's row.
const claimWait = 250 * time.Millisecond

// descheduleWaitHook runs before each of lockClaimed's reads (tests hold it
// there).
var descheduleWaitHook = func() {}
