package main

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Claim cost as the table grows: the time per claim+execute of a no-op job
// (FlushQueue, one job per claim, in order) with few and with many finished
// jobs in async_job, then with a backlog of pending jobs scheduled for
// tomorrow on top (at the same priority as the jobs run, the default one: a
// claim must not read them). Rows are bulk-loaded; Postgres and MySQL then
// get fresh planner statistics, as autovacuum / InnoDB would give them.
// On Postgres the case's connections commit with synchronous_commit off:
// each job's commit otherwise waits for a WAL flush, whose latency on this
// kind of machine swings by 2x within minutes whatever the table's size,
// and the rows' ratios followed it (0.84x-2.11x in seven runs).

const claimWarmJobs = 20

// claimFutureJobs is the backlog of pending jobs scheduled for tomorrow in
// the last claim-cost row.
const claimFutureJobs = 100_000

func (d *dbRun) claimCases(ctx context.Context) error {
	e, cfg, kind := d.e, d.cfg, d.e.kind
	if err := e.reset(ctx); err != nil {
		return err
	}
	if kind == "postgres" {
		const set = "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I " // the scratch database, for connections opened from now on
		if _, err := e.admin.ExecContext(ctx, set+"SET synchronous_commit = off', current_database()); END $$"); err != nil {
			return err
		}
		defer func() {
			_, _ = e.admin.ExecContext(context.WithoutCancel(ctx), set+"RESET synchronous_commit', current_database()); END $$")
		}()
	}
	var n atomicCounter
	db, closeDB, err := e.openGorm(4, countingPlugin(&n.Int64, false))
	if err != nil {
		return err
	}
	defer closeDB()
	raw, err := e.openRaw(2)
	if err != nil {
		return err
	}
	defer raw.Close()
	var base *row
	have := 0
	for _, rows := range cfg.claimRows {
		if rows > have {
			if err := loadFinished(ctx, e, raw, rows-have); err != nil {
				return err
			}
			have = rows
		}
		if err := e.analyze(ctx); err != nil {
			return err
		}
		per, err := d.claimCost(ctx, db, raw)
		if err != nil {
			return err
		}
		name := fmt.Sprintf("claim+execute, %s finished rows", count(rows))
		var tgt *target
		if base != nil {
			tgt = ratioAtMost(1.5)
		}
		x := d.rep.add(kind, name, per, "ms/job", base, fmt.Sprintf("median of %d rounds of %d jobs (FlushQueue)", claimRounds, cfg.claimJobs/claimRounds), tgt)
		if base == nil {
			base = x
		}
	}
	tomorrow := time.Now().Add(24 * time.Hour)
	start := time.Now()
	if err := e.bulkJobsAt(ctx, raw, taskNoop, 0, claimFutureJobs, false, &tomorrow); err != nil {
		return err
	}
	progress("%s: loaded %s pending jobs scheduled for tomorrow in %s", kind, count(claimFutureJobs), time.Since(start).Round(time.Millisecond))
	if err := e.analyze(ctx); err != nil {
		return err
	}
	per, err := d.claimCost(ctx, db, raw)
	if err != nil {
		return err
	}
	name := fmt.Sprintf("claim+execute, %s finished + %s pending for tomorrow", count(have), count(claimFutureJobs))
	d.rep.add(kind, name, per, "ms/job", base, fmt.Sprintf("median of %d rounds of %d jobs (FlushQueue)", claimRounds, cfg.claimJobs/claimRounds), ratioAtMost(1.5))
	return nil
}

// loadFinished bulk-loads n executed no-op jobs, reporting progress.
func loadFinished(ctx context.Context, e *env, raw *sql.DB, n int) error {
	const chunk = 100_000
	start := time.Now()
	for done := 0; done < n; done += chunk {
		if err := e.bulkJobs(ctx, raw, taskNoop, 0, min(chunk, n-done), true); err != nil {
			return err
		}
		if n > chunk {
			progress("%s: loaded %s of %s finished jobs", e.kind, count(min(done+chunk, n)), count(n))
		}
	}
	progress("%s: loaded %s finished jobs in %s", e.kind, count(n), time.Since(start).Round(time.Millisecond))
	return nil
}

// claimRounds is how many times each claim cost is measured; the median counts.
const claimRounds = 5

// claimCost adds -claim-jobs pending no-op jobs and runs them one by one
// through FlushQueue on the default queue (the worker's claim query), in
// claimRounds rounds; it returns the median milliseconds per job.
func (d *dbRun) claimCost(ctx context.Context, db *gorm.DB, raw *sql.DB) (float64, error) {
	per := d.cfg.claimJobs / claimRounds
	if err := d.e.bulkJobs(ctx, raw, taskNoop, 0, claimWarmJobs+per*claimRounds, false); err != nil {
		return 0, err
	}
	h := db.WithContext(ctx)
	queues := []string{async.DefaultQueue}
	if _, err := async.FlushQueue(h, async.FlushOptions{Jobs: claimWarmJobs, Queues: queues}); err != nil {
		return 0, err
	}
	stop := d.profileCase(fmt.Sprintf("claim %d", d.cfg.claimJobs))
	defer stop()
	var ms []float64
	for i := 0; i < claimRounds; i++ {
		start := time.Now()
		ran, err := async.FlushQueue(h, async.FlushOptions{Jobs: per, Queues: queues})
		elapsed := time.Since(start)
		if err != nil {
			return 0, err
		}
		if ran != per {
			return 0, fmt.Errorf("FlushQueue ran %d of %d jobs", ran, per)
		}
		ms = append(ms, float64(elapsed)/float64(time.Millisecond)/float64(ran))
	}
	return percentiles(ms, 0.5)[0], nil
}

// count writes 10000 as 10k and 1000000 as 1M.
func count(n int) string {
	switch {
	case n >= 1_000_000 && n%1_000_000 == 0:
		return fmt.Sprintf("%dM", n/1_000_000)
	case n >= 1000 && n%1000 == 0:
		return fmt.Sprintf("%dk", n/1000)
	}
	return fmt.Sprint(n)
}
