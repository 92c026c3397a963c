package async

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"gorm.io/gorm"
)

// Progress is the progress of a group, with the keys of the reference's
// group progress operation.
type Progress struct {
	// ID is the group's id.
	ID int64 `json:"id"`
	// Reference is the group's reference.
	Reference string `json:"reference"`
	// Created is when the group was created.
	Created time.Time `json:"created"`
	// LatestJobCompleted is the latest execution time among its jobs, nil
	// when none is executed.
	LatestJobCompleted *time.Time `json:"latest_job_completed"`
	// TotalJobs counts the group's jobs, its final job included.
	TotalJobs int64 `json:"total_jobs"`
	// TotalExecutedJobs counts its executed jobs.
	TotalExecutedJobs int64 `json:"total_executed_jobs"`
	// TotalUnexecutedJobs is TotalJobs - TotalExecutedJobs: pending,
	// cancelled and failed jobs.
	TotalUnexecutedJobs int64 `json:"total_unexecuted_jobs"`
	// TotalErrorJobs counts its jobs with at least one recorded error.
	TotalErrorJobs int64 `json:"total_error_jobs"`
	// CurrentErrors counts its jobs with errors that are still pending.
	CurrentErrors int64 `json:"current_errors"`
	// ConsumedSeconds is the time since the group was created, or from its
	// creation to its completion once no job is pending. Nil while no job is
	// done (executed, cancelled or failed).
	ConsumedSeconds *float64 `json:"consumed_seconds"`
	// RemainingSeconds estimates the time left: ConsumedSeconds extrapolated
	// over the jobs not yet done; zero once the group is complete, nil while
	// no job is done.
	RemainingSeconds *float64 `json:"remaining_seconds"`
}

// GroupProgress reports the progress of the latest group with this
// reference; it returns an error wrapping ErrGroupNotFound when there is none.
func GroupProgress(db *gorm.DB, reference string) (*Progress, error) {
	p, err := pluginOf(db)
	if err != nil {
		return nil, err
	}
	s := db.Session(&gorm.Session{NewDB: true})
	now := p.now()
	var groups []Group
	if err := s.Where("reference = ?", reference).Order("created DESC, id DESC").Limit(1).Find(&groups).Error; err != nil {
		return nil, fmt.Errorf("async: group progress %q: %w", reference, err)
	}
	if len(groups) == 0 {
		return nil, errorf(ErrGroupNotFound, "no group has reference %q", reference)
	}
	g := groups[0]
	pr := &Progress{ID: g.ID, Reference: g.Reference, Created: g.Created}
	fail := func(err error) (*Progress, error) {
		return nil, fmt.Errorf("async: group progress %q: %w", reference, err)
	}
	var open int64
	err = s.Raw("SELECT COUNT(*), COALESCE(SUM(CASE WHEN executed IS NOT NULL THEN 1 ELSE 0 END), 0),"+
		" COALESCE(SUM(CASE WHEN "+pending(jobTable)+" THEN 1 ELSE 0 END), 0) FROM "+jobTable+" WHERE group_id = ?", g.ID).
		Row().Scan(&pr.TotalJobs, &pr.TotalExecutedJobs, &open)
	if err != nil {
		return fail(err)
	}
	pr.TotalUnexecutedJobs = pr.TotalJobs - pr.TotalExecutedJobs
	err = s.Raw("SELECT COUNT(DISTINCT e.job_id), COUNT(DISTINCT CASE WHEN "+pending("j")+" THEN e.job_id END) FROM "+
		errorTable+" e JOIN "+jobTable+" j ON j.id = e.job_id WHERE j.group_id = ?", g.ID).
		Row().Scan(&pr.TotalErrorJobs, &pr.CurrentErrors)
	if err != nil {
		return fail(err)
	}
	// The latest job done: executed first, else cancelled or failed (a group
	// whose jobs were all cancelled still completed at some time).
	var last []Job
	err = s.Model(&Job{}).Select("id, executed, cancelled, failed").Where("group_id = ? AND executed IS NOT NULL", g.ID).
		Order("executed DESC").Limit(1).Find(&last).Error
	if err != nil {
		return fail(err)
	}
	var completedAt *time.Time
	if len(last) == 1 {
		pr.LatestJobCompleted, completedAt = last[0].Executed, last[0].Executed
	} else if open == 0 && pr.TotalJobs > 0 {
		err = s.Model(&Job{}).Select("id, executed, cancelled, failed").Where("group_id = ?", g.ID).
			Order("COALESCE(cancelled, failed) DESC").Limit(1).Find(&last).Error
		if err != nil {
			return fail(err)
		}
		if len(last) == 1 {
			completedAt = last[0].Cancelled
			if completedAt == nil {
				completedAt = last[0].Failed
			}
		}
	}
	consumed, remaining := estimateGroup(pr.TotalJobs, open, g.Created, now, completedAt)
	if consumed != nil {
		c, r := consumed.Seconds(), remaining.Seconds()
		pr.ConsumedSeconds, pr.RemainingSeconds = &c, &r
	}
	return pr, nil
}

// GroupProgressHandler serves GroupProgress as JSON. The reference is the
// query parameter reference or, without it, the last segment of the URL
// path (URL-escaped, so it may contain a slash as %2F). An unknown
// reference is a 404.
func GroupProgressHandler(db *gorm.DB) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ref := r.URL.Query().Get("reference")
		if ref == "" {
			path := r.URL.EscapedPath()
			seg, err := url.PathUnescape(path[strings.LastIndex(path, "/")+1:])
			if err != nil {
				http.Error(w, "async: bad group reference in the URL path", http.StatusBadRequest)
				return
			}
			ref = seg
		}
		if ref == "" {
			http.Error(w, "async: no group reference (add it to the URL path or as ?reference=)", http.StatusBadRequest)
			return
		}
		pr, err := GroupProgress(db.WithContext(r.Context()), ref)
		switch {
		case errors.Is(err, ErrGroupNotFound):
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		case err != nil:
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, pr)
	})
}
