package async

import (
	"encoding/json"
	"fmt"
	"net/http"

	"gorm.io/gorm"
)

// HealthReport is the queue's health, for monitoring. It marshals to the
// reference's JSON shape: {"queue": {...}, "errors": {"number": n}}.
type HealthReport struct {
	Queue    QueueHealth  `json:"queue"`
	Errors   ErrorsHealth `json:"errors"`
	Database DialectInfo  `json:"database"`
}

// QueueHealth counts jobs by state.
type QueueHealth struct {
	// AllJobs counts every job.
	AllJobs int64 `json:"all-jobs"`
	// Executed counts jobs that completed.
	Executed int64 `json:"executed"`
	// Remaining counts pending jobs: not executed, cancelled or failed.
	Remaining int64 `json:"remaining"`
	// NotExecuted is the reference's duplicate of Remaining.
	NotExecuted int64 `json:"not-executed"`
	// Cancelled counts descheduled jobs.
	Cancelled int64 `json:"cancelled"`
	// Failed counts jobs in the terminal failed state.
	Failed int64 `json:"failed"`
}

// ErrorsHealth counts recorded failures.
type ErrorsHealth struct {
	// Number is the number of error rows ever recorded for existing jobs.
	Number int64 `json:"number"`
}

// Health reports the queue's state.
func Health(db *gorm.DB) (*HealthReport, error) {
	p, err := pluginOf(db)
	if err != nil {
		return nil, err
	}
	s := db.Session(&gorm.Session{NewDB: true})
	r := &HealthReport{Database: p.dialect.info()}
	q := &r.Queue
	err = s.Raw("SELECT COUNT(*) AS all_jobs,"+
		" COALESCE(SUM(CASE WHEN executed IS NOT NULL THEN 1 ELSE 0 END), 0) AS executed,"+
		" COALESCE(SUM(CASE WHEN "+pending(jobTable)+" THEN 1 ELSE 0 END), 0) AS remaining,"+
		" COALESCE(SUM(CASE WHEN cancelled IS NOT NULL THEN 1 ELSE 0 END), 0) AS cancelled,"+
		" COALESCE(SUM(CASE WHEN failed IS NOT NULL THEN 1 ELSE 0 END), 0) AS failed"+
		" FROM "+jobTable).Row().Scan(&q.AllJobs, &q.Executed, &q.Remaining, &q.Cancelled, &q.Failed)
	if err != nil {
		return nil, fmt.Errorf("async: health: %w", err)
	}
	q.NotExecuted = q.Remaining
	if err := s.Model(&JobError{}).Count(&r.Errors.Number).Error; err != nil {
		return nil, fmt.Errorf("async: health: %w", err)
	}
	return r, nil
}

// HealthHandler serves Health as JSON.
func HealthHandler(db *gorm.DB) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rep, err := Health(db.WithContext(r.Context()))
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(rep)
	})
}
