package async

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"gorm.io/gorm"
)

// HealthReport is the queue's health, for monitoring. It marshals to the
// reference's JSON shape, {"queue": {...}, "errors": {"number": n}}, plus
// the database in use.
type HealthReport struct {
	Queue    QueueHealth  `json:"queue"`
	Errors   ErrorsHealth `json:"errors"`
	Database DialectInfo  `json:"database"`
}

// QueueHealth counts jobs by state, with the reference's keys. A job is in
// exactly one state: pending (counted by Remaining), executed, cancelled or
// failed.
type QueueHealth struct {
	// AllJobs counts every job.
	AllJobs int64 `json:"all-jobs"`
	// Executed counts jobs that completed.
	Executed int64 `json:"executed"`
	// ExecutedDetails counts executed jobs per task name.
	ExecutedDetails map[string]NameCount `json:"executed-details"`
	// OldestExecuted is the job executed first, nil when none is.
	OldestExecuted *JobRef `json:"oldest-executed"`
	// MostRecentExecuted is the job executed last, nil when none is.
	MostRecentExecuted *JobRef `json:"most-recent-executed"`
	// Remaining counts pending jobs: not executed, cancelled or failed.
	Remaining int64 `json:"remaining"`
	// NotExecuted is the reference's duplicate of Remaining.
	NotExecuted int64 `json:"not-executed"`
	// NotExecutedDetails counts pending jobs per task name.
	NotExecutedDetails map[string]NameCount `json:"not-executed-details"`
	// Cancelled counts descheduled jobs.
	Cancelled int64 `json:"cancelled"`
	// OldestCancelled is the job cancelled first, nil when none is.
	OldestCancelled *JobRef `json:"oldest-cancelled"`
	// MostRecentCancelled is the job cancelled last, nil when none is.
	MostRecentCancelled *JobRef `json:"most-recent-cancelled"`
	// CancelledDetails counts cancelled jobs per task name (the reference
	// counted the jobs that are not cancelled here, a bug).
	CancelledDetails map[string]NameCount `json:"cancelled-details"`
	// Failed counts jobs in the terminal failed state.
	Failed int64 `json:"failed"`
	// FailedDetails counts failed jobs per task name.
	FailedDetails map[string]NameCount `json:"failed-details"`
	// OldestDueAgeSeconds is how long the oldest job that could be claimed
	// now has been due (since its scheduled time, or since it was added when
	// it has none), at least zero; nil when no job is due. Jobs held by a
	// claim and final jobs waiting for their group are not counted.
	OldestDueAgeSeconds *float64 `json:"oldest-due-age-seconds"`
	// EstimatedCompletionCurrentJob is the seconds left for the jobs running
	// now (see AlgorithmPrecise; zero when none is known to run).
	EstimatedCompletionCurrentJob float64 `json:"estimated-completion-current-job"`
	// EstimatedCompletion is the seconds until the queue is empty, by
	// EstimationAlgorithm.
	EstimatedCompletion float64 `json:"estimated-completion"`
	// EstimationAlgorithm is AlgorithmRough or AlgorithmPrecise.
	EstimationAlgorithm string `json:"estimation-algorithm"`
}

// NameCount is a per-task-name count, {"count": n} in JSON.
type NameCount struct {
	Count int64 `json:"count"`
}

// JobRef points at a job in a health report. It marshals to Link when set
// (from Plugin.JobLink), else to the job's id.
type JobRef struct {
	ID   int64
	Link string
}

// MarshalJSON writes the link, or the id when there is no link.
func (r JobRef) MarshalJSON() ([]byte, error) {
	if r.Link != "" {
		return json.Marshal(r.Link)
	}
	return json.Marshal(r.ID)
}

// UnmarshalJSON reads a link (a JSON string) or an id (a number).
func (r *JobRef) UnmarshalJSON(b []byte) error {
	*r = JobRef{}
	if len(b) > 0 && b[0] == '"' {
		return json.Unmarshal(b, &r.Link)
	}
	return json.Unmarshal(b, &r.ID)
}

// ErrorsHealth counts recorded failures.
type ErrorsHealth struct {
	// Number is the number of error rows ever recorded for existing jobs.
	Number int64 `json:"number"`
}

// HealthOption configures Health.
type HealthOption func(*healthConfig)

type healthConfig struct{ algorithm string }

// Algorithm selects the estimation algorithm of Health's
// estimated-completion: AlgorithmRough (the default) or AlgorithmPrecise.
// Any other name makes Health return an error wrapping ErrUnknownAlgorithm.
func Algorithm(name string) HealthOption { return func(c *healthConfig) { c.algorithm = name } }

// Health reports the queue's state.
func Health(db *gorm.DB, opts ...HealthOption) (*HealthReport, error) {
	p, err := pluginOf(db)
	if err != nil {
		return nil, err
	}
	cfg := healthConfig{algorithm: AlgorithmRough}
	for _, o := range opts {
		if o != nil {
			o(&cfg)
		}
	}
	if cfg.algorithm != AlgorithmRough && cfg.algorithm != AlgorithmPrecise {
		return nil, errorf(ErrUnknownAlgorithm, "%q (want %q or %q)", cfg.algorithm, AlgorithmRough, AlgorithmPrecise)
	}
	s := db.Session(&gorm.Session{NewDB: true})
	now := p.now()
	r := &HealthReport{Database: p.dialect.info()}
	off, err := p.clockOffset(s)
	if err != nil {
		return nil, fmt.Errorf("async: health: reading the database's clock: %w", err)
	}
	r.Database.ClockOffsetSeconds = &off
	q := &r.Queue
	q.EstimationAlgorithm = cfg.algorithm
	if err := p.countByName(s, q); err != nil {
		return nil, fmt.Errorf("async: health: %w", err)
	}
	for _, l := range []struct {
		dst  **JobRef
		col  string
		desc bool
	}{
		{&q.OldestExecuted, "executed", false}, {&q.MostRecentExecuted, "executed", true},
		{&q.OldestCancelled, "cancelled", false}, {&q.MostRecentCancelled, "cancelled", true},
	} {
		if *l.dst, err = p.jobRef(s, l.col, l.desc); err != nil {
			return nil, fmt.Errorf("async: health: %w", err)
		}
	}
	if q.OldestDueAgeSeconds, err = p.oldestDueAge(s, now); err != nil {
		return nil, fmt.Errorf("async: health: %w", err)
	}
	if q.EstimatedCompletionCurrentJob, err = p.currentJobEstimate(s, now); err != nil {
		return nil, err
	}
	if cfg.algorithm == AlgorithmPrecise {
		q.EstimatedCompletion, err = p.preciseEstimate(s, now)
	} else {
		q.EstimatedCompletion, err = p.roughEstimate(s, now)
	}
	if err != nil {
		return nil, err
	}
	if err := s.Model(&JobError{}).Count(&r.Errors.Number).Error; err != nil {
		return nil, fmt.Errorf("async: health: %w", err)
	}
	return r, nil
}

// countByName fills the counts and their per-name details.
func (p *Plugin) countByName(s *gorm.DB, q *QueueHealth) error {
	var rows []struct {
		Name      string
		All       int64 `gorm:"column:n_all"`
		Executed  int64 `gorm:"column:n_executed"`
		Open      int64 `gorm:"column:n_open"`
		Cancelled int64 `gorm:"column:n_cancelled"`
		Failed    int64 `gorm:"column:n_failed"`
	}
	err := s.Raw("SELECT name, COUNT(*) AS n_all," +
		" SUM(CASE WHEN executed IS NOT NULL THEN 1 ELSE 0 END) AS n_executed," +
		" SUM(CASE WHEN " + pending(jobTable) + " THEN 1 ELSE 0 END) AS n_open," +
		" SUM(CASE WHEN cancelled IS NOT NULL THEN 1 ELSE 0 END) AS n_cancelled," +
		" SUM(CASE WHEN failed IS NOT NULL THEN 1 ELSE 0 END) AS n_failed" +
		" FROM " + jobTable + " GROUP BY name").Scan(&rows).Error
	if err != nil {
		return err
	}
	q.ExecutedDetails, q.NotExecutedDetails = map[string]NameCount{}, map[string]NameCount{}
	q.CancelledDetails, q.FailedDetails = map[string]NameCount{}, map[string]NameCount{}
	add := func(total *int64, details map[string]NameCount, name string, n int64) {
		if n > 0 {
			*total += n
			details[name] = NameCount{Count: n}
		}
	}
	for _, r := range rows {
		q.AllJobs += r.All
		add(&q.Executed, q.ExecutedDetails, r.Name, r.Executed)
		add(&q.Remaining, q.NotExecutedDetails, r.Name, r.Open)
		add(&q.Cancelled, q.CancelledDetails, r.Name, r.Cancelled)
		add(&q.Failed, q.FailedDetails, r.Name, r.Failed)
	}
	q.NotExecuted = q.Remaining
	return nil
}

// jobRef finds the job with the smallest (or largest) time in col.
func (p *Plugin) jobRef(s *gorm.DB, col string, desc bool) (*JobRef, error) {
	order := col + ", id"
	if desc {
		order = col + " DESC, id DESC"
	}
	var ids []int64
	if err := s.Model(&Job{}).Where(col+" IS NOT NULL").Order(order).Limit(1).Pluck("id", &ids).Error; err != nil {
		return nil, err
	}
	if len(ids) == 0 {
		return nil, nil
	}
	ref := &JobRef{ID: ids[0]}
	if p.JobLink != nil {
		ref.Link = p.JobLink(ref.ID)
	}
	return ref, nil
}

// oldestDueAge is the age of the oldest job a claim could take now.
func (p *Plugin) oldestDueAge(s *gorm.DB, now time.Time) (*float64, error) {
	var jobs []Job
	err := s.Model(&Job{}).Select("id, added, scheduled").
		Where(pending(jobTable)+" AND ("+jobTable+".scheduled IS NULL OR "+jobTable+".scheduled <= ?)", now).
		Where("("+jobTable+".locked_until IS NULL OR "+jobTable+".locked_until < ?)", now).
		Where("NOT EXISTS (SELECT 1 FROM " + groupTable + " g JOIN " + jobTable + " o ON o.group_id = g.id WHERE g.id = " +
			jobTable + ".group_id AND g.final_id = " + jobTable + ".id AND o.id <> " + jobTable + ".id AND " + pending("o") + ")").
		Order("COALESCE(" + jobTable + ".scheduled, " + jobTable + ".added), id").Limit(1).Find(&jobs).Error
	if err != nil || len(jobs) == 0 {
		return nil, err
	}
	due := jobs[0].Added
	if jobs[0].Scheduled != nil {
		due = *jobs[0].Scheduled
	}
	// At least zero: the job is due by this clock, and a due time ahead of
	// it was written by a process whose clock is ahead of this one's.
	age := max(now.Sub(due).Seconds(), 0)
	return &age, nil
}

// HealthHandler serves Health as JSON. The query parameter algorithm
// selects the estimation algorithm (default rough); an unknown one is a 400.
func HealthHandler(db *gorm.DB) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var opts []HealthOption
		if a := r.URL.Query().Get("algorithm"); a != "" {
			opts = append(opts, Algorithm(a))
		}
		rep, err := Health(db.WithContext(r.Context()), opts...)
		switch {
		case errors.Is(err, ErrUnknownAlgorithm):
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		case err != nil:
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, rep)
	})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
