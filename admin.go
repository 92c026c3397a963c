package async

import (
	"fmt"

	"gorm.io/gorm"
)

// Retry makes a failed (or cancelled) job pending again, with its attempts
// reset, to run as soon as possible. Its recorded errors are kept.
func Retry(db *gorm.DB, id int64) error {
	p, err := pluginOf(db)
	if err != nil {
		return err
	}
	err = p.serializeEntry(ctxOf(db), fmt.Sprintf("retrying job %d", id), func() error {
		res := db.Session(&gorm.Session{NewDB: true}).Exec("UPDATE "+jobTable+
			" SET failed = NULL, cancelled = NULL, attempts = 0, scheduled = NULL, locked_by = '', locked_until = NULL"+
			" WHERE id = ? AND executed IS NULL AND (failed IS NOT NULL OR cancelled IS NOT NULL)", id)
		if res.Error != nil {
			return fmt.Errorf("async: retrying job %d: %w", id, res.Error)
		}
		if res.RowsAffected == 0 {
			var j Job
			if db.Session(&gorm.Session{NewDB: true}).Where("id = ?", id).Take(&j).Error != nil {
				return errorf(ErrJobNotFound, "job %d", id)
			}
			return errorf(ErrBadOption, "job %d %s: only failed or cancelled jobs can be retried", id, j.state())
		}
		return nil
	})
	if err != nil {
		return err
	}
	// The job runs at once: wake idle workers, here and elsewhere.
	p.wakers.broadcast()
	if q := p.dialect.notifySQL(); q != "" {
		if err := db.Session(&gorm.Session{NewDB: true}).Exec(q).Error; err != nil {
			p.Logger.Warn("async: retry: could not notify other processes' workers; they find the job at their next poll", "job", id, "error", err)
		}
	}
	return nil
}
