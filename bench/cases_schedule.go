package main

import (
	"context"
	"fmt"

	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Scheduling: jobs/s of async.Schedule, one job per transaction and many
// jobs in one transaction, next to raw database/sql inserts of the same rows
// into a copy of async_job, at the same concurrency, on fresh tables: the
// one-job pair in alternating rounds (scheduleAt), the many-job pair back to
// back. On Postgres the one-job-per-transaction baseline
// inserts into the copy with the library's NOTIFY trigger on it, as the
// library's inserts fire it; the same loop without the trigger is a
// diagnostic row next to it.

func (d *dbRun) scheduleCases(ctx context.Context) error {
	conc := []int{1}
	if d.best > 1 {
		conc = append(conc, d.best)
	}
	for _, c := range conc {
		if err := d.scheduleAt(ctx, c); err != nil {
			return err
		}
	}
	return nil
}

func (d *dbRun) scheduleAt(ctx context.Context, c int) error {
	e, cfg, kind := d.e, d.cfg, d.e.kind
	if err := e.reset(ctx); err != nil {
		return err
	}
	var n atomicCounter
	db, closeDB, err := e.openGorm(c+2, countingPlugin(&n.Int64, false))
	if err != nil {
		return err
	}
	defer closeDB()
	if err := e.createRawTable(ctx); err != nil {
		return fmt.Errorf("creating bench_raw: %w", err)
	}
	pg := kind == "postgres"
	onPG := func(t *target) *target {
		if pg {
			return t
		}
		return nil
	}

	// The baseline of one job per transaction: the same inserts, one row
	// per transaction, into bench_raw. On Postgres bench_raw then carries
	// the library's NOTIFY trigger, as async_job does (a notifying commit
	// takes a database-wide lock through its WAL flush, which serialises
	// such commits), and the trigger-less loop is measured first as a
	// diagnostic: its ratio to the baseline is what NOTIFY costs.
	var noTrig float64
	var noTrigNote string
	if pg {
		if noTrig, noTrigNote, err = rawInsertRate(ctx, e, c, 1, cfg.duration); err != nil {
			return fmt.Errorf("raw insert without trigger: %w", err)
		}
		// The baseline starts on an empty table, as Schedule does.
		if _, err := e.admin.ExecContext(ctx, "TRUNCATE bench_raw"); err != nil {
			return err
		}
		if err := e.rawNotifyTrigger(ctx, true); err != nil {
			return err
		}
	}
	// The baseline and Schedule run in rounds of half the measuring time,
	// in the order baseline, Schedule, Schedule, baseline, and each rate is
	// the mean of its two rounds: a drift across the pair (a checkpoint
	// started by the cases before, the disk's flush latency) then weighs on
	// both alike. Measured back to back instead, the baseline first, two
	// full runs gave 0.81x and 0.77x at c=1 where the case run alone gave
	// 0.96x-1.06x. The notes' CPU figures are the first round's.
	half := cfg.duration / 2
	var raws, libs [2]float64
	var rawNote1, note1 string
	// round measures round i into rates[i], keeping the first round's note.
	round := func(what string, rates *[2]float64, firstNote *string, measure func() (float64, string, error)) func(int) error {
		return func(i int) error {
			r, note, err := measure()
			if err != nil {
				return fmt.Errorf("%s: %w", what, err)
			}
			if i == 0 {
				*firstNote = note
			}
			rates[i] = r
			return nil
		}
	}
	rawRound := round("raw insert", &raws, &rawNote1, func() (float64, string, error) {
		return rawInsertRate(ctx, e, c, 1, half)
	})
	stop := d.profileCase(fmt.Sprintf("schedule-1 c=%d", c))
	libRound := round("schedule one per tx", &libs, &note1, func() (float64, string, error) {
		return loopCPU(ctx, c, half, func(ctx context.Context, _ int) (int, error) {
			return 1, db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
				_, err := async.Schedule(tx, taskNoop)
				return err
			})
		})
	})
	if err := rawRound(0); err != nil {
		return err
	}
	e.trace.start()
	err = libRound(0)
	if err == nil {
		err = libRound(1)
	}
	traced := e.trace.stop(int64((libs[0] + libs[1]) * half.Seconds()))
	stop()
	if err != nil {
		return err
	}
	if err := rawRound(1); err != nil {
		return err
	}
	raw1, lib1 := (raws[0]+raws[1])/2, (libs[0]+libs[1])/2
	rounds := fmt.Sprintf("rounds %.0f, %.0f; ", raws[0], raws[1])
	name1 := fmt.Sprintf("raw insert+commit c=%d", c)
	if pg {
		if err := e.rawNotifyTrigger(ctx, false); err != nil {
			return err
		}
		name1 = fmt.Sprintf("raw insert+commit (same table, NOTIFY trigger) c=%d", c)
	}
	base1 := d.rep.add(kind, name1, raw1, "jobs/s", nil, "baseline; "+rounds+rawNote1)
	if pg {
		d.rep.add(kind, fmt.Sprintf("raw insert+commit, no trigger (diagnostic: NOTIFY's cost) c=%d", c), noTrig, "jobs/s", base1,
			"diagnostic, not a baseline; "+noTrigNote)
	}
	d.rep.trace(kind, fmt.Sprintf("schedule 1 job/tx c=%d", c), traced)
	d.rep.add(kind, fmt.Sprintf("schedule 1 job/tx c=%d", c), lib1, "jobs/s", base1,
		fmt.Sprintf("rounds %.0f, %.0f, alternating with the baseline's; %s", libs[0], libs[1], note1), onPG(ratioAtLeast(0.9)))

	k := cfg.schedBatch
	rawK, rawNoteK, err := rawInsertRate(ctx, e, c, k, cfg.duration)
	if err != nil {
		return fmt.Errorf("raw multi-row insert: %w", err)
	}
	if r := e.rawRowsPerStmt(k); r < k {
		rawNoteK = fmt.Sprintf("%d rows per statement; %s", r, rawNoteK)
	}
	baseK := d.rep.add(kind, fmt.Sprintf("raw %d-row insert/tx c=%d", k, c), rawK, "jobs/s", nil, "baseline; "+rawNoteK)
	stop = d.profileCase(fmt.Sprintf("schedule-%d c=%d", k, c))
	e.trace.start()
	libK, noteK, err := loopCPU(ctx, c, cfg.duration, func(ctx context.Context, _ int) (int, error) {
		return k, db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
			calls := make([]async.Call, k)
			for i := range calls {
				calls[i] = async.Task(taskNoop)
			}
			_, err := async.ScheduleMany(tx, calls...)
			return err
		})
	})
	stop()
	if err != nil {
		return fmt.Errorf("schedule many per tx: %w", err)
	}
	d.rep.trace(kind, fmt.Sprintf("ScheduleMany %d jobs/tx c=%d", k, c), e.trace.stop(int64(libK*cfg.duration.Seconds())))
	d.rep.add(kind, fmt.Sprintf("ScheduleMany %d jobs/tx c=%d", k, c), libK, "jobs/s", baseK, noteK,
		onPG(ratioAtLeast(0.8)), onPG(valueAtLeast(40000, "jobs/s")))
	return nil
}
