package async

import (
	"context"
	"fmt"
	"slices"
	"time"

	"gorm.io/gorm"
)

// RemoveOldJobs is the built-in cleanup task, registered by the plugin:
//
//	async.Schedule(tx, async.RemoveOldJobs, async.Args(30, 8))
//
// It deletes jobs executed, cancelled or failed strictly more than days days
// ago, with their errors; a group goes (with all its jobs) only when every
// one of its jobs qualifies. Then it schedules itself to run again after
// hours hours. All of it happens in the job's transaction.
func RemoveOldJobs(ctx context.Context, tx *gorm.DB, days, hours int) error {
	p, err := pluginOf(tx)
	if err != nil {
		return err
	}
	if days < 0 || hours <= 0 {
		return Permanent(errorf(ErrBadArguments, "RemoveOldJobs(days=%d, hours=%d): days must be >= 0 and hours > 0", days, hours))
	}
	now := p.now()
	cutoff := now.Add(-time.Duration(days) * 24 * time.Hour)
	db := tx.Session(&gorm.Session{NewDB: true})
	const old = "(executed < ? OR cancelled < ? OR failed < ?)"
	// Ungrouped old jobs.
	oldJobs := db.Model(&Job{}).Select("id").Where("group_id IS NULL AND "+old, cutoff, cutoff, cutoff)
	if err := db.Where("job_id IN (?)", oldJobs).Delete(&JobError{}).Error; err != nil {
		return fmt.Errorf("async: removing old errors: %w", err)
	}
	res := db.Where("group_id IS NULL AND "+old, cutoff, cutoff, cutoff).Delete(&Job{})
	if res.Error != nil {
		return fmt.Errorf("async: removing old jobs: %w", res.Error)
	}
	removed := res.RowsAffected
	// Groups all of whose jobs are old.
	var groups []int64
	err = db.Raw("SELECT group_id FROM "+jobTable+" WHERE group_id IS NOT NULL GROUP BY group_id HAVING SUM(CASE WHEN "+old+" THEN 1 ELSE 0 END) = COUNT(*)",
		cutoff, cutoff, cutoff).Scan(&groups).Error
	if err != nil {
		return fmt.Errorf("async: finding old groups: %w", err)
	}
	for ids := range slices.Chunk(groups, idChunk) {
		jobs := db.Model(&Job{}).Select("id").Where("group_id IN ?", ids)
		if err := db.Where("job_id IN (?)", jobs).Delete(&JobError{}).Error; err != nil {
			return fmt.Errorf("async: removing old group errors: %w", err)
		}
		res := db.Where("group_id IN ?", ids).Delete(&Job{})
		if res.Error != nil {
			return fmt.Errorf("async: removing old group jobs: %w", res.Error)
		}
		removed += res.RowsAffected
		if err := db.Where("id IN ?", ids).Delete(&Group{}).Error; err != nil {
			return fmt.Errorf("async: removing old groups: %w", err)
		}
	}
	p.Logger.Info("async: removing old jobs", "cutoff", cutoff, "jobs", removed, "groups", len(groups))
	_, err = Schedule(tx, RemoveOldJobs, Args(days, hours), RunAfter(now.Add(time.Duration(hours)*time.Hour)))
	return err
}

func registerBuiltins() {
	if lookupTask(funcName(RemoveOldJobs)) == nil {
		MustRegister(RemoveOldJobs)
	}
}
