package async

import (
	"fmt"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"
)

// Groups collect jobs under a reference. Several generations may share a
// reference: the newest is current while it has pending jobs (or none yet);
// once all its jobs are done, scheduling into the reference starts a new one.

// InGroup adds the job to the current group with this reference, creating
// the group (or its next generation) when needed.
func InGroup(reference string) Option {
	return func(s *jobSpec) {
		if reference == "" || len(reference) > 191 {
			s.err = errorf(ErrBadOption, "group reference %q must have 1 to 191 bytes", reference)
		}
		s.group = reference
	}
}

// joinGroup returns the id of the group a new job with this reference joins.
//
// Two transactions that find no open group under the reference at the same
// time both try to start the same generation. The unique index on
// (reference, generation) makes the later insert wait for the earlier
// transaction; if that commits, the insert finds the generation taken and
// does nothing, and the job joins the group the other transaction created
// (read with a lock, which sees it even from a snapshot taken before it was
// committed, as under MySQL's REPEATABLE READ). If that group is already
// done, the next generation is tried.
func (p *Plugin) joinGroup(db *gorm.DB, reference string) (*int64, error) {
	var g Group
	err := db.Where("reference = ?", reference).Order("created DESC, id DESC").Limit(1).Find(&g).Error
	if err != nil {
		return nil, fmt.Errorf("async: finding group %q: %w", reference, err)
	}
	last := int64(-1) // the reference's highest generation, read when a group must be started
	for {
		if g.ID != 0 {
			finalDone := false
			if g.FinalID != nil {
				if finalDone, err = p.holdFinal(db, *g.FinalID); err != nil {
					return nil, fmt.Errorf("async: reading final job of group %q: %w", reference, err)
				}
			}
			switch open, err := groupOpen(db, &g); {
			case err != nil:
				return nil, err
			case open && !finalDone:
				return &g.ID, nil
			}
			// A final job done means a group done: under MySQL's
			// REPEATABLE READ the count may come from a snapshot taken
			// before the final job (waited for above) committed.
		}
		if last < 0 {
			if err := db.Model(&Group{}).Select("COALESCE(MAX(generation), 0)").Where("reference = ?", reference).Scan(&last).Error; err != nil {
				return nil, fmt.Errorf("async: finding group %q: %w", reference, err)
			}
		}
		if g.Generation != nil && *g.Generation > last {
			last = *g.Generation
		}
		gen := last + 1
		next := Group{Reference: reference, Description: g.Description, Created: p.now(), Generation: &gen}
		if err := db.Clauses(clause.OnConflict{DoNothing: true}).Create(&next).Error; err != nil {
			return nil, fmt.Errorf("async: creating group %q: %w", reference, err)
		}
		// The generation's row: this one, or one another transaction
		// committed first (then the insert did nothing). Read back rather
		// than trusted from the insert's result, which differs by database
		// (MariaDB's RETURNING gives the other row's id, MySQL may count a
		// duplicate as a row found). The loop goes on only if the other
		// transaction's group is done already, one generation higher each
		// time.
		g = Group{}
		err := db.Clauses(clause.Locking{Strength: clause.LockingStrengthUpdate}).
			Where("reference = ? AND generation = ?", reference, gen).Take(&g).Error
		if err != nil {
			return nil, fmt.Errorf("async: reading group %q generation %d: %w", reference, gen, err)
		}
	}
}

// holdFinal keeps a group's final job (id) from running until the
// transaction of a job joining the group ends, and reports whether the
// final job is done already. Its row stays locked until then: a claim
// skips it (SKIP LOCKED), and a run that already holds it (strict mode)
// is waited for, so that the job then finds the group done and starts the
// next generation. A claim on it that has not started its run (a
// worker's ready job, or a group-commit batch, which does not lock its
// rows) is taken back, its attempt uncounted: that run is skipped, and the
// final job runs after the joining job. Without this, a job joining a
// group whose final job was claimed (a group whose only job is its final
// job runs it at once) ended up pending in a group whose final job had run.
// The final job's own task, joining its group, finds it done likewise: the
// group ends with it.
func (p *Plugin) holdFinal(db *gorm.DB, id int64) (done bool, err error) {
	if rc, ok := db.Statement.ConnPool.(*runConn); ok && rc.running.Load() == id {
		return true, nil
	}
	var f []Job
	err = db.Clauses(clause.Locking{Strength: clause.LockingStrengthUpdate}).
		Select("id, executed, cancelled, failed, attempts, locked_by, locked_until").Where("id = ?", id).Limit(1).Find(&f).Error
	if err != nil || len(f) == 0 {
		return false, err // none (removed by cleanup): nothing to hold
	}
	if !f[0].Pending() {
		return true, nil
	}
	if f[0].LockedBy != "" && f[0].LockedUntil != nil && f[0].LockedUntil.After(p.now()) {
		q, args := releaseSQL([]*Job{&f[0]}) // given back as any unstarted claim is
		err = db.Exec(q, args...).Error
	}
	return false, err
}

// groupOpen reports whether jobs may still join g: none of its jobs is done
// yet. A group some but not all of whose jobs are done refuses new ones
// (ErrGroupHasExecutedJobs); a group all of whose jobs are done is closed.
func groupOpen(db *gorm.DB, g *Group) (bool, error) {
	var counts struct{ Total, Pending int64 }
	err := db.Raw("SELECT COUNT(*) AS total, COALESCE(SUM(CASE WHEN "+pending(jobTable)+" THEN 1 ELSE 0 END), 0) AS pending FROM "+jobTable+" WHERE group_id = ?", g.ID).
		Scan(&counts).Error
	switch {
	case err != nil:
		return false, fmt.Errorf("async: reading group %q: %w", g.Reference, err)
	case counts.Total == 0 || counts.Pending == counts.Total:
		return true, nil
	case counts.Pending > 0:
		return false, errorf(ErrGroupHasExecutedJobs, "cannot add a job to group %q (id %d): %d of its %d jobs are already done",
			g.Reference, g.ID, counts.Total-counts.Pending, counts.Total)
	}
	return false, nil
}

// OnCompletion schedules the final job of the current group with this
// reference (creating the group if needed): it runs only after every other
// job of the group is executed, cancelled or failed. A group whose only job
// is its final job runs it at once. Setting a final job again replaces the
// earlier one as the group's final job (the earlier job stays in the group).
//
// On a plain handle the job and its place as the final job commit together,
// so that no worker finds it as an ordinary member in between.
func OnCompletion(tx *gorm.DB, reference string, task any, opts ...Option) (*Job, error) {
	p, err := pluginOf(tx)
	if err != nil {
		return nil, err
	}
	if tx.Error != nil {
		return nil, fmt.Errorf("async: on completion of group %q: the handle already carries an error: %w", reference, tx.Error)
	}
	var job *Job
	err = p.atomically(tx.Session(&gorm.Session{NewDB: true}), func(db *gorm.DB) error {
		j, err := Schedule(db, task, append(opts, InGroup(reference))...)
		if err != nil {
			return err
		}
		if err := db.Model(&Group{}).Where("id = ?", *j.GroupID).Update("final_id", j.ID).Error; err != nil {
			return fmt.Errorf("async: setting final job of group %q: %w", reference, err)
		}
		job = j
		return nil
	})
	if err != nil {
		return nil, err
	}
	return job, nil
}
