package async

import (
	"fmt"
	"math"
	"slices"
	"time"

	"gorm.io/gorm"
)

// Completion estimates, after the reference's stats.py and
// Group.estimate_execution_duration, with its bugs fixed:
//   - durations are whole (the reference's timedelta.seconds dropped days);
//   - executed jobs without a start time are left out of averages instead of
//     crashing the report, and so are negative waits (a job run early by
//     Job.Execute);
//   - a group whose jobs were all cancelled or failed has an estimate too;
//   - several jobs with a start time each add their own estimate, clamped at
//     zero, instead of crashing (the reference expected at most one);
//   - the precise estimate counts only the remaining time of open groups:
//     completed groups add nothing (the reference added their whole
//     duration, and the whole estimated duration of open ones).

// Estimation algorithms for Health's estimated-completion.
const (
	// AlgorithmRough multiplies the number of pending jobs by the average run
	// time plus wait of the jobs executed in the last day. It is Health's default.
	AlgorithmRough = "rough"
	// AlgorithmPrecise adds the remaining time of each open group, the
	// estimate for the jobs running now and, for ungrouped pending jobs, the
	// average run time of executed ungrouped jobs of the same task. It is the
	// queue_health command's default.
	AlgorithmPrecise = "precise"
)

// round2 rounds to 2 decimals, like the reference's round(x, 2).
func round2(x float64) float64 { return math.Round(x*100) / 100 }

// estimateGroup estimates a group from its job counts: consumed is the time
// since the group was created (until completedAt once it has no pending job),
// and remaining extrapolates consumed over the jobs not done yet. Both are nil
// while no job is done (nothing to extrapolate from).
func estimateGroup(total, open int64, created, now time.Time, completedAt *time.Time) (consumed, remaining *time.Duration) {
	done := total - open
	if total == 0 || done == 0 {
		return nil, nil
	}
	// created, and completedAt, may come from other processes' clocks,
	// ahead of now's or of each other: durations are at least zero.
	var c, r time.Duration
	if open > 0 {
		c = max(now.Sub(created), 0)
		// estimated total = consumed / done * total; remaining = estimated - consumed.
		r = time.Duration(float64(c) * float64(open) / float64(done))
	} else if completedAt != nil {
		c = max(completedAt.Sub(created), 0)
	}
	return &c, &r
}

// roughEstimate is the reference's rough algorithm.
func (p *Plugin) roughEstimate(db *gorm.DB, now time.Time) (float64, error) {
	run := p.dialect.secondsBetween("started", "executed")
	wait := p.dialect.secondsBetween("scheduled", "started")
	var n int64
	var sumRun, sumWait float64
	err := db.Raw("SELECT COUNT(*), COALESCE(SUM("+run+"), 0),"+
		" COALESCE(SUM(CASE WHEN scheduled IS NOT NULL AND started > scheduled THEN "+wait+" ELSE 0 END), 0)"+
		" FROM "+jobTable+" WHERE executed > ? AND started IS NOT NULL", now.Add(-24*time.Hour)).
		Row().Scan(&n, &sumRun, &sumWait)
	if err != nil {
		return 0, fmt.Errorf("async: rough estimate: %w", err)
	}
	var waiting int64
	err = db.Raw("SELECT COUNT(*) FROM " + jobTable + " WHERE " + pending(jobTable) + " AND started IS NULL").Row().Scan(&waiting)
	if err != nil {
		return 0, fmt.Errorf("async: rough estimate: %w", err)
	}
	div := float64(max(n, 1))
	return round2(float64(waiting) * (sumRun/div + sumWait/div)), nil
}

// ungroupedAverage is the SQL of the average run time, per task name, of
// executed ungrouped jobs.
func (p *Plugin) ungroupedAverage() string {
	return "SELECT name, AVG(" + p.dialect.secondsBetween("started", "executed") + ") AS avg_run FROM " + jobTable +
		" WHERE group_id IS NULL AND executed IS NOT NULL AND started IS NOT NULL GROUP BY name"
}

// currentJobEstimate is the time left for the jobs that have a start time
// but are still pending: for each, the average run time of executed
// ungrouped jobs of its task minus the time it has run, at least zero. As in
// the reference, a run's start time is committed only with its completion,
// so this is zero unless an application records started times itself.
func (p *Plugin) currentJobEstimate(db *gorm.DB, now time.Time) (float64, error) {
	var cur []Job
	err := db.Model(&Job{}).Select("id, name, started").Where(pending(jobTable) + " AND started IS NOT NULL").Find(&cur).Error
	if err != nil {
		return 0, fmt.Errorf("async: current job estimate: %w", err)
	}
	if len(cur) == 0 {
		return 0, nil
	}
	var avgs []struct {
		Name   string
		AvgRun float64
	}
	if err := db.Raw(p.ungroupedAverage()).Scan(&avgs).Error; err != nil {
		return 0, fmt.Errorf("async: current job estimate: %w", err)
	}
	byName := make(map[string]float64, len(avgs))
	for _, a := range avgs {
		byName[a.Name] = a.AvgRun
	}
	total := 0.0
	for _, j := range cur {
		if left := byName[j.Name] - now.Sub(*j.Started).Seconds(); left > 0 {
			total += left
		}
	}
	return round2(total), nil
}

// preciseEstimate is the reference's precise algorithm, fixed.
func (p *Plugin) preciseEstimate(db *gorm.DB, now time.Time) (float64, error) {
	groups, err := p.openGroupsRemaining(db, now)
	if err != nil {
		return 0, err
	}
	current, err := p.currentJobEstimate(db, now)
	if err != nil {
		return 0, err
	}
	var ungrouped float64
	err = db.Raw("SELECT COALESCE(SUM(q.n * a.avg_run), 0) FROM (SELECT name, COUNT(*) AS n FROM " + jobTable +
		" WHERE group_id IS NULL AND " + pending(jobTable) + " AND started IS NULL GROUP BY name) q JOIN (" +
		p.ungroupedAverage() + ") a ON a.name = q.name").Row().Scan(&ungrouped)
	if err != nil {
		return 0, fmt.Errorf("async: precise estimate: %w", err)
	}
	return round2(groups + current + ungrouped), nil
}

// openGroupsRemaining sums, in seconds, the remaining time of every group
// that still has pending jobs.
func (p *Plugin) openGroupsRemaining(db *gorm.DB, now time.Time) (float64, error) {
	open := "SUM(CASE WHEN " + pending(jobTable) + " THEN 1 ELSE 0 END)"
	var rows []struct {
		GroupID  int64
		Total    int64
		OpenJobs int64
	}
	err := db.Raw("SELECT group_id, COUNT(*) AS total, " + open + " AS open_jobs FROM " + jobTable +
		" WHERE group_id IS NOT NULL GROUP BY group_id HAVING " + open + " > 0").Scan(&rows).Error
	if err != nil {
		return 0, fmt.Errorf("async: group estimates: %w", err)
	}
	sum := 0.0
	for chunk := range slices.Chunk(rows, idChunk) {
		ids := make([]int64, len(chunk))
		for i, r := range chunk {
			ids[i] = r.GroupID
		}
		var groups []Group
		if err := db.Where("id IN ?", ids).Find(&groups).Error; err != nil {
			return 0, fmt.Errorf("async: group estimates: %w", err)
		}
		created := make(map[int64]time.Time, len(groups))
		for _, g := range groups {
			created[g.ID] = g.Created
		}
		for _, r := range chunk {
			c, ok := created[r.GroupID]
			if !ok {
				continue // jobs of a deleted group
			}
			if _, rem := estimateGroup(r.Total, r.OpenJobs, c, now, nil); rem != nil {
				sum += rem.Seconds()
			}
		}
	}
	return sum, nil
}
