package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Pickup latency: an idle worker (poll interval one hour, so only wake-ups
// count) and a producer that commits one job at a time with a gap. The
// producer notes the time right after its commit returned, the task the time
// it started; the difference is the pickup latency. The producer runs in
// this process (the in-process wake-up at commit) or in a child process
// (on Postgres, LISTEN/NOTIFY; elsewhere only polling can find the job, so
// the worker polls every second there and the figure shows that).

const latencyWarmJobs = 5 // first jobs, not counted

func (d *dbRun) latencyCases(ctx context.Context) error {
	for _, outOfProc := range []bool{false, true} {
		if err := d.latency(ctx, outOfProc); err != nil {
			return err
		}
	}
	return nil
}

func (d *dbRun) latency(ctx context.Context, outOfProc bool) error {
	e, cfg, kind := d.e, d.cfg, d.e.kind
	if err := e.reset(ctx); err != nil {
		return err
	}
	var n atomicCounter
	db, closeDB, err := e.openGorm(8, countingPlugin(&n.Int64, false))
	if err != nil {
		return err
	}
	defer closeDB()
	producer, poll, note := "in-process producer", time.Hour, ""
	if outOfProc {
		producer = "producer in another process"
		if kind != "postgres" {
			poll = time.Second
			note = "no cross-process wake-up on " + kind + ": found by the 1s poll"
		}
	}
	w, err := newWorker(db, 4, 1, poll)
	if err != nil {
		return err
	}
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(wctx) }()
	defer func() { cancel(); <-done }()
	pause(ctx, 500*time.Millisecond) // the worker's first (empty) claim, and LISTEN

	starts.reset()
	samples := max(20, int(cfg.duration/cfg.latencyGap))
	total := latencyWarmJobs + samples
	var mu sync.Mutex
	commits := map[int]time.Time{}
	stop := d.profileCase("latency " + producer)
	if outOfProc {
		err = produceInChild(ctx, e, total, cfg.latencyGap, func(seq int, at time.Time) {
			mu.Lock()
			commits[seq] = at
			mu.Unlock()
		})
	} else {
		for seq := 1; seq <= total && err == nil; seq++ {
			var at time.Time
			if at, err = commitOne(db, seq); err == nil {
				commits[seq] = at
				pause(ctx, cfg.latencyGap)
			}
		}
	}
	stop()
	if err != nil {
		return err
	}
	deadline := time.Now().Add(2*poll + 10*time.Second)
	for starts.len() < total && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	var ms []float64
	missing := 0
	for seq := latencyWarmJobs + 1; seq <= total; seq++ {
		s, ok := starts.get(seq)
		c, ok2 := commits[seq]
		if !ok || !ok2 {
			missing++
			continue
		}
		ms = append(ms, float64(s.Sub(c))/float64(time.Millisecond))
	}
	if len(ms) == 0 {
		return fmt.Errorf("latency (%s): no job was picked up", producer)
	}
	if missing > 0 {
		note = fmt.Sprintf("%d of %d jobs not picked up; %s", missing, samples, note)
	}
	p := percentiles(ms, 0.5, 0.95, 0.99)
	pg := kind == "postgres"
	onPG := func(t *target) *target {
		if pg {
			return t
		}
		return nil
	}
	sn := fmt.Sprintf("n=%d", len(ms))
	if note != "" {
		sn += "; " + note
	}
	d.rep.add(kind, "pickup p50, "+producer, p[0], "ms", nil, sn, onPG(valueAtMost(5, "ms")))
	d.rep.add(kind, "pickup p95, "+producer, p[1], "ms", nil, "")
	d.rep.add(kind, "pickup p99, "+producer, p[2], "ms", nil, "", onPG(valueAtMost(25, "ms")))
	return nil
}

// commitOne schedules latency job seq in its own transaction and returns
// the time the commit returned.
func commitOne(db *gorm.DB, seq int) (time.Time, error) {
	err := db.Transaction(func(tx *gorm.DB) error {
		_, err := async.Schedule(tx, taskLatency, async.Args(seq))
		return err
	})
	return time.Now(), err
}

// produceInChild runs a producer child and reports its commit times.
func produceInChild(ctx context.Context, e *env, jobs int, gap time.Duration, got func(seq int, at time.Time)) error {
	k, err := startChild(childSpec{Mode: "producer", Kind: e.kind, DSN: e.dsn, Jobs: jobs, Gap: gap},
		func(f []string) {
			if len(f) == 3 && f[0] == "commit" {
				got(int(atoi64(f[1])), time.Unix(0, atoi64(f[2])))
			}
		})
	if err != nil {
		return err
	}
	// The producer exits by itself once done; stop it early only if the
	// bench is interrupted or it overruns.
	limit := time.NewTimer(time.Duration(jobs)*gap*2 + 60*time.Second)
	defer limit.Stop()
	select {
	case <-k.exited:
	case <-ctx.Done():
	case <-limit.C:
	}
	return k.stop(10 * time.Second)
}
