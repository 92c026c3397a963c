package main

import (
	"context"
	"fmt"
	"time"
)

// Worker memory: a child worker process runs -rss-jobs no-op jobs, fed by
// the bench; its peak resident set (VmHWM) after a warm-up tenth of the jobs
// is compared with its peak at the end. "Flat" is taken as within 20%.

const rssFlat = 1.2

func (d *dbRun) rssCase(ctx context.Context) error {
	e, cfg, kind := d.e, d.cfg, d.e.kind
	if err := e.reset(ctx); err != nil {
		return err
	}
	var n atomicCounter
	_, closeDB, err := e.openGorm(2, countingPlugin(&n.Int64, false)) // migrates
	if err != nil {
		return err
	}
	defer closeDB()
	raw, err := e.openRaw(2)
	if err != nil {
		return err
	}
	defer raw.Close()
	c := d.best
	if c == 0 {
		c = d.cfg.conc[len(d.cfg.conc)-1]
	}
	wc := workerCase{task: taskNoop, conc: c, procs: 1, batch: cfg.rssBatch}
	kids, err := d.startWorkerChildren(ctx, wc, throughputPoll)
	if err != nil {
		return err
	}
	total := int64(cfg.rssJobs)
	// The feeder keeps about -queue-depth jobs pending, topping up in whole
	// statements once a fifth of them is gone.
	low := cfg.queueDepth - max(cfg.queueDepth/5, 1) + 1
	f := newFeeder(e, raw, taskNoop, low, cfg.queueDepth, 0, total, kids.executed)
	if err := f.start(ctx); err != nil {
		return errorsJoin(err, kids.stop())
	}
	k := kids[0]
	warmAt := max(total/10, 1)
	// Each job leaves dead row versions behind. Where the server's
	// autovacuum is off (as on some test machines) they pile up in the
	// pending-jobs index and every claim reads past them, so the bench
	// vacuums as autovacuum would, and says so.
	vacuumEvery, nextVacuum, vacuums := int64(0), int64(0), 0
	if kind == "postgres" {
		var av string
		if err := raw.QueryRowContext(ctx, "SHOW autovacuum").Scan(&av); err == nil && av == "off" {
			vacuumEvery = max(total/10, 1)
			nextVacuum = vacuumEvery
		}
	}
	var warmHWM, warmRSS, last int64
	start, lastMove, lastLog := time.Now(), time.Now(), time.Now()
	for err == nil {
		pause(ctx, 200*time.Millisecond)
		done := k.executed.Load()
		switch {
		case ctx.Err() != nil:
			err = ctx.Err()
		case done >= total:
		case time.Since(lastMove) > time.Minute:
			err = fmt.Errorf("no job ran for a minute (%d of %d done)", done, total)
		}
		if done != last {
			last, lastMove = done, time.Now()
		}
		if warmHWM == 0 && done >= warmAt && k.hwmKB.Load() > 0 {
			warmHWM, warmRSS = k.hwmKB.Load(), k.rssKB.Load()
		}
		if vacuumEvery > 0 && done >= nextVacuum && done < total {
			nextVacuum += vacuumEvery
			vacuums++
			if _, verr := raw.ExecContext(ctx, "VACUUM async_job"); verr != nil {
				err = fmt.Errorf("vacuum: %w", verr)
			}
		}
		if time.Since(lastLog) > 10*time.Second {
			lastLog = time.Now()
			progress("%s: rss case: %d of %d jobs, RSS %.1f MB, peak %.1f MB", kind, done, total,
				float64(k.rssKB.Load())/1024, float64(k.hwmKB.Load())/1024)
		}
		if done >= total {
			break
		}
	}
	elapsed := time.Since(start)
	err = errorsJoin(err, f.halt(), kids.stop())
	if err != nil {
		return err
	}
	endHWM, endRSS := k.hwmKB.Load(), k.rssKB.Load()
	base := d.rep.add(kind, fmt.Sprintf("worker peak RSS after %s jobs (warm-up)", count(int(warmAt))), float64(warmHWM)/1024, "MB", nil,
		fmt.Sprintf("RSS then %.1f MB; c=%d K=%d", float64(warmRSS)/1024, c, cfg.rssBatch))
	note := fmt.Sprintf("RSS at end %.1f MB; %.0f jobs/s", float64(endRSS)/1024, float64(last)/elapsed.Seconds())
	if vacuums > 0 {
		note += fmt.Sprintf("; autovacuum is off on this server: the bench ran VACUUM async_job %d times", vacuums)
	}
	d.rep.add(kind, fmt.Sprintf("worker peak RSS after %s jobs", count(int(total))), float64(endHWM)/1024, "MB", base,
		note, ratioAtMost(rssFlat))
	return nil
}
