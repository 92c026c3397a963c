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
//
// Each table size has a scratch database of its own, and the rounds of the
// sizes alternate, so that a slow minute of this shared machine slows every
// size alike: measured one size after the other, the Postgres rows' ratios
// swung between 0.84x and 2.11x over seven runs. On Postgres the case's
// connections also commit with synchronous_commit off: each job's commit
// otherwise waits for a WAL flush, whose latency does not depend on the
// table.

const claimWarmJobs = 20

// claimFutureJobs is the backlog of pending jobs scheduled for tomorrow in
// the last claim-cost row.
const claimFutureJobs = 100_000

// claimRounds is how many rounds each size runs, alternating with the
// others; the median counts.
const claimRounds = 7

// claimTable is one size's scratch database.
type claimTable struct {
	e     *env
	db    *gorm.DB // the plugin's handle, FlushQueue's pool
	raw   *sql.DB  // bulk loads
	close func()
	ms    []float64 // the rounds' milliseconds per job
}

func (d *dbRun) claimCases(ctx context.Context) error {
	cfg, kind := d.cfg, d.e.kind
	var tables []*claimTable
	defer func() {
		for _, t := range tables {
			t.close()
		}
	}()
	for i, rows := range cfg.claimRows {
		t, err := d.openClaimTable(ctx, i)
		if err != nil {
			return err
		}
		tables = append(tables, t)
		if err := loadFinished(ctx, t.e, t.raw, rows); err != nil {
			return err
		}
	}
	if err := d.claimRoundsAlternating(ctx, "claim", tables); err != nil {
		return err
	}
	roundsNote := func(with string) string {
		return fmt.Sprintf("median of %d rounds of %d jobs (FlushQueue), alternating with %s", claimRounds, cfg.claimJobs/claimRounds, with)
	}
	note := roundsNote("the other sizes")
	var base *row
	for i, t := range tables {
		var tgt *target
		if base != nil {
			tgt = ratioAtMost(1.5)
		}
		x := d.rep.add(kind, fmt.Sprintf("claim+execute, %s finished rows", count(cfg.claimRows[i])), median(t.ms), "ms/job", base, note, tgt)
		if base == nil {
			base = x
		}
	}
	// The largest table gets the backlog for tomorrow and runs beside the
	// smallest again.
	small, big := tables[0], tables[len(tables)-1]
	if big == small {
		return nil
	}
	tomorrow := time.Now().Add(24 * time.Hour)
	start := time.Now()
	if err := big.e.bulkJobsAt(ctx, big.raw, taskNoop, 0, claimFutureJobs, false, &tomorrow); err != nil {
		return err
	}
	progress("%s: loaded %s pending jobs scheduled for tomorrow in %s", kind, count(claimFutureJobs), time.Since(start).Round(time.Millisecond))
	if err := d.claimRoundsAlternating(ctx, "claim tomorrow", []*claimTable{small, big}); err != nil {
		return err
	}
	base = d.rep.add(kind, fmt.Sprintf("claim+execute, %s finished rows, beside the next row", count(cfg.claimRows[0])), median(small.ms), "ms/job", nil,
		"median of rounds alternating with the next row's", nil)
	d.rep.add(kind, fmt.Sprintf("claim+execute, %s finished + %s pending for tomorrow", count(cfg.claimRows[len(tables)-1]), count(claimFutureJobs)),
		median(big.ms), "ms/job", base, roundsNote("the row above"), ratioAtMost(1.5))
	return nil
}

// openClaimTable opens the i-th size's scratch database (the run's own for
// the first), empty, with the library installed.
func (d *dbRun) openClaimTable(ctx context.Context, i int) (*claimTable, error) {
	e, closeEnv := d.e, func() {}
	if i > 0 {
		c := *d.cfg
		c.scratch = fmt.Sprintf("%s_claim%d", c.scratch, i)
		var err error
		if e, err = openEnv(ctx, &c, d.e.kind); err != nil {
			return nil, err
		}
		closeEnv = func() { e.close(c.keep) }
	}
	t := &claimTable{e: e, close: closeEnv}
	fail := func(err error) (*claimTable, error) {
		t.close()
		return nil, err
	}
	if err := e.reset(ctx); err != nil {
		return fail(err)
	}
	if e.kind == "postgres" {
		const set = "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I " // for connections opened from now on
		if _, err := e.admin.ExecContext(ctx, set+"SET synchronous_commit = off', current_database()); END $$"); err != nil {
			return fail(err)
		}
		prev := t.close
		t.close = func() {
			_, _ = e.admin.ExecContext(context.WithoutCancel(ctx), set+"RESET synchronous_commit', current_database()); END $$")
			prev()
		}
	}
	var n atomicCounter
	db, closeDB, err := e.openGorm(4, countingPlugin(&n.Int64, false))
	if err != nil {
		return fail(err)
	}
	raw, err := e.openRaw(2)
	if err != nil {
		closeDB()
		return fail(err)
	}
	t.db, t.raw = db.WithContext(ctx), raw
	prev := t.close
	t.close = func() {
		_ = raw.Close()
		closeDB()
		prev()
	}
	return t, nil
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

// claimRoundsAlternating gives every table -claim-jobs pending no-op jobs,
// analyzes it, then runs claimRounds rounds of its jobs one by one through
// FlushQueue on the default queue (the worker's claim query), the tables'
// rounds alternating; each table's ms holds its rounds' milliseconds per
// job. label names the CPU profile of the rounds (-profile-cases).
func (d *dbRun) claimRoundsAlternating(ctx context.Context, label string, tables []*claimTable) error {
	per := d.cfg.claimJobs / claimRounds
	queues := []string{async.DefaultQueue}
	for _, t := range tables {
		if err := t.e.bulkJobs(ctx, t.raw, taskNoop, 0, claimWarmJobs+per*claimRounds, false); err != nil {
			return err
		}
		if err := t.e.analyze(ctx); err != nil {
			return err
		}
		t.ms = nil
	}
	for _, t := range tables {
		if _, err := async.FlushQueue(t.db, async.FlushOptions{Jobs: claimWarmJobs, Queues: queues}); err != nil {
			return err
		}
	}
	stop := d.profileCase(label)
	defer stop()
	for i := 0; i < claimRounds; i++ {
		for _, t := range tables {
			start := time.Now()
			ran, err := async.FlushQueue(t.db, async.FlushOptions{Jobs: per, Queues: queues})
			elapsed := time.Since(start)
			if err != nil {
				return err
			}
			if ran != per {
				return fmt.Errorf("FlushQueue ran %d of %d jobs", ran, per)
			}
			t.ms = append(t.ms, float64(elapsed)/float64(time.Millisecond)/float64(ran))
		}
	}
	return nil
}

// median of xs.
func median(xs []float64) float64 { return percentiles(xs, 0.5)[0] }

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
