package async

import (
	"fmt"

	"gorm.io/gorm"
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
func (p *Plugin) joinGroup(db *gorm.DB, reference string) (*int64, error) {
	var g Group
	err := db.Where("reference = ?", reference).Order("created DESC, id DESC").Limit(1).Find(&g).Error
	if err != nil {
		return nil, fmt.Errorf("async: finding group %q: %w", reference, err)
	}
	if g.ID != 0 {
		var counts struct{ Total, Pending int64 }
		err := db.Raw("SELECT COUNT(*) AS total, COALESCE(SUM(CASE WHEN "+pending(jobTable)+" THEN 1 ELSE 0 END), 0) AS pending FROM "+jobTable+" WHERE group_id = ?", g.ID).
			Scan(&counts).Error
		if err != nil {
			return nil, fmt.Errorf("async: reading group %q: %w", reference, err)
		}
		switch {
		case counts.Total == 0 || counts.Pending == counts.Total:
			return &g.ID, nil // open: no job has finished yet
		case counts.Pending > 0:
			return nil, errorf(ErrGroupHasExecutedJobs, "cannot add a job to group %q (id %d): %d of its %d jobs are already done",
				reference, g.ID, counts.Total-counts.Pending, counts.Total)
		}
		// Completed: start the next generation below.
	}
	next := Group{Reference: reference, Description: g.Description, Created: p.now()}
	if err := db.Create(&next).Error; err != nil {
		return nil, fmt.Errorf("async: creating group %q: %w", reference, err)
	}
	return &next.ID, nil
}

// OnCompletion schedules the final job of the current group with this
// reference (creating the group if needed): it runs only after every other
// job of the group is executed, cancelled or failed. A group whose only job
// is its final job runs it at once. Setting a final job again replaces the
// earlier one as the group's final job (the earlier job stays in the group).
func OnCompletion(tx *gorm.DB, reference string, task any, opts ...Option) (*Job, error) {
	job, err := Schedule(tx, task, append(opts, InGroup(reference))...)
	if err != nil {
		return nil, err
	}
	err = tx.Session(&gorm.Session{NewDB: true}).Model(&Group{}).Where("id = ?", *job.GroupID).Update("final_id", job.ID).Error
	if err != nil {
		return nil, fmt.Errorf("async: setting final job of group %q: %w", reference, err)
	}
	return job, nil
}
