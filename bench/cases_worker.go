package main

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Worker throughput: jobs/s of workers draining a prefilled queue, for a
// no-op task and a task that inserts one row, at several concurrencies, in
// this process or split over two child processes, strict (one job per
// transaction) or with group commit. Each figure is compared with the
// throughput baseline (pgbench -N TPS on Postgres, the raw
// one-row-update-and-commit loop elsewhere) at the same total concurrency.
//
// The queue is filled before the workers start with enough jobs for the
// warm-up and the measuring window, so that nothing but the workers writes
// while they are measured: a feeder topping the queue up during the window
// shared the CPUs with the workers and its inserts were a large share of the
// load at high rates. The prefill is sized from the rate of the previous
// case of the same kind (see rateEstimate); a feeder remains as a safety net
// that tops up only when fewer than -queue-depth jobs are pending, and a case
// where it had to during the window says so in its note.

// throughputPoll is the workers' poll interval: short, so that a worker
// never idles long on a database that cannot wake it (the feeder's raw
// inserts wake no one but Postgres listeners).
const throughputPoll = 20 * time.Millisecond

// prefillMargin is how many times the jobs the estimated rate would run in
// the warm-up and measuring window the prefill holds.
const prefillMargin = 1.5

// maxRateGrowth bounds how much faster than the previous case of its kind
// a case at a higher concurrency is expected to run.
const maxRateGrowth = 2

// Rates assumed for the first case of a kind in a run (jobs/s): above what
// the first cases (c=1) reach on a small machine, so that they rather
// overfill. A claim's cost does not depend on how many jobs are pending, on
// any database, so overfilling costs only the untimed prefill. (MySQL used
// to start lower: its claims read every pending row.)
const (
	defaultStrictRate = 12000
	defaultGroupRate  = 50000
)

// rateKey is the kind of throughput case a rate estimate is kept for, per
// database: strict or group commit, and the task.
type rateKey struct {
	group bool
	task  string
}

func keyOf(wc workerCase) rateKey { return rateKey{group: wc.batch > 1, task: wc.task} }

// pastRate is the rate a throughput case measured, at its concurrency.
type pastRate struct {
	rate float64
	conc int
}

// rateEstimate is the jobs/s expected of wc: the rate of the previous case
// of its kind in this run, or a default for the first one. A case at a
// higher concurrency than the previous one is expected to run faster, in
// proportion but at most twice as fast: the strict cases' rate can nearly
// double from c=1 to c=4, more than the margin of 1.5 covers, while SQLite
// (one writer) barely speeds up from c=1 to c=8.
func (d *dbRun) rateEstimate(wc workerCase) float64 {
	if p, ok := d.rates[keyOf(wc)]; ok {
		return p.rate * min(maxRateGrowth, max(1, float64(wc.conc)/float64(p.conc)))
	}
	if wc.batch > 1 {
		return defaultGroupRate
	}
	return defaultStrictRate
}

// noteRate records a case's measured rate for the next case of its kind.
func (d *dbRun) noteRate(wc workerCase, rate float64) {
	if d.rates == nil {
		d.rates = map[rateKey]pastRate{}
	}
	d.rates[keyOf(wc)] = pastRate{rate: rate, conc: wc.conc}
}

// prefillSize is how many jobs to put in the queue before wc's workers
// start: the estimated rate over the warm-up and measuring window, with a
// margin, on top of -queue-depth. The feeder tops up once fewer than
// -queue-depth jobs are pending, so those are not for the workers to run
// in the window: without them the margin would shrink to little at low
// rates (at 1,500 jobs/s, 2,000 jobs are a quarter of the prefill).
func (d *dbRun) prefillSize(wc workerCase) (n int, estimate float64) {
	estimate = d.rateEstimate(wc)
	window := warmup(d.cfg.duration) + d.cfg.duration
	return d.cfg.queueDepth + int(math.Ceil(estimate*window.Seconds()*prefillMargin)), estimate
}

type workerCase struct {
	task  string
	conc  int // total job slots, split evenly over procs
	procs int // 1: in this process; more: child processes
	batch int // jobs per transaction (WorkerOptions.BatchSize); 1 is strict mode
}

func (w workerCase) String() string {
	return fmt.Sprintf("worker %s c=%d procs=%d K=%d", strings.TrimPrefix(w.task, "bench."), w.conc, w.procs, w.batch)
}

func (d *dbRun) workerCases(ctx context.Context) error {
	kind := d.e.kind
	conc := d.concurrencies()
	if kind == "sqlite" {
		// SQLite has one writer: jobs run one at a time whatever the
		// concurrency, so two concurrencies show it.
		conc = slices.DeleteFunc(conc, func(c int) bool { return c != 1 && c != 4 && c != d.best })
	}
	batches := []int{1}
	if d.cfg.batchK > 1 {
		batches = append(batches, d.cfg.batchK)
	}
	for _, c := range conc {
		// The baseline again, right before the cases compared with it: the
		// machine's load drifts during a run.
		base, err := d.measureBase(ctx, c, " (adjacent)")
		if err != nil {
			return err
		}
		for _, batch := range batches {
			for _, task := range []string{taskNoop, taskInsert} {
				for _, procs := range []int{1, 2} {
					if c < procs {
						continue
					}
					wc := workerCase{task: task, conc: c, procs: procs, batch: batch}
					if !d.cfg.workerOnly.MatchString(wc.String()) {
						continue
					}
					rate, note, err := d.workerRate(ctx, wc)
					if err != nil {
						if ctx.Err() != nil {
							return err
						}
						d.rep.fail(kind, wc.String(), err)
						continue
					}
					d.rep.add(kind, wc.String(), rate, "jobs/s", base, note, d.workerTarget(wc))
				}
			}
		}
	}
	return nil
}

// workerTarget is the target for a worker figure, if it has one.
func (d *dbRun) workerTarget(wc workerCase) *target {
	switch d.e.kind {
	case "postgres":
		if wc.conc != d.best {
			return nil
		}
		if wc.batch > 1 {
			return ratioAtLeast(5)
		}
		return ratioAtLeast(1)
	case "mysql":
		if wc.task == taskNoop && wc.batch == 1 {
			return ratioAtLeast(1)
		}
	case "sqlite":
		if wc.task == taskNoop && wc.batch == 1 && wc.procs == 1 {
			return valueAtLeast(3000, "jobs/s")
		}
	}
	return nil
}

// workerRate runs one throughput case on fresh tables.
func (d *dbRun) workerRate(ctx context.Context, wc workerCase) (rate float64, note string, err error) {
	e, cfg := d.e, d.cfg
	if err := e.reset(ctx); err != nil {
		return 0, "", err
	}
	var n atomicCounter
	db, closeDB, err := e.openGorm(wc.conc+4, countingPlugin(&n.Int64, false))
	if err != nil {
		return 0, "", err
	}
	defer closeDB()
	if wc.task == taskInsert {
		if err := e.createEffectTable(ctx); err != nil {
			return 0, "", err
		}
	}
	raw, err := e.openRaw(2)
	if err != nil {
		return 0, "", err
	}
	defer raw.Close()

	// Prefill before the workers start; its time is not measured.
	prefill, estimate := d.prefillSize(wc)
	t0 := time.Now()
	if err := e.bulkJobs(ctx, raw, wc.task, 1, prefill, false); err != nil {
		return 0, "", fmt.Errorf("prefill: %w", err)
	}
	progress("%s: %s: prefilled %d jobs in %s (%.0f jobs/s expected)", e.kind, wc, prefill,
		time.Since(t0).Round(time.Millisecond), estimate)

	var count func() int64
	var stopWorkers func() error
	var kids children
	if wc.procs == 1 {
		w, err := newWorker(db, wc.conc, wc.batch, throughputPoll)
		if err != nil {
			return 0, "", err
		}
		wctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- w.Run(wctx) }()
		count = n.get
		stopWorkers = func() error { cancel(); return <-done }
	} else {
		kids, err = d.startWorkerChildren(ctx, wc, throughputPoll)
		if err != nil {
			return 0, "", err
		}
		count = kids.executed
		stopWorkers = kids.stop
	}
	// The safety net: it tops the queue up to twice -queue-depth should
	// fewer than -queue-depth jobs be left (the estimate was too low).
	f := newFeeder(e, raw, wc.task, cfg.queueDepth, 2*cfg.queueDepth, int64(prefill), 0, count)
	ferr := f.start(ctx)
	if ferr == nil {
		pause(ctx, warmup(cfg.duration))
		stop := func() {}
		if wc.procs == 1 {
			stop = d.profileCase(wc.String())
		}
		k0, n0, f0 := kids.cpu(), count(), f.inserted.Load()
		if wc.procs == 1 {
			e.trace.start()
		}
		rate, note, err = rateOver(ctx, cfg.duration, count, wc.procs == 1)
		k1, n1, fed := kids.cpu(), count(), f.insertedSince(f0)
		if len(kids) > 0 && n1 > n0 {
			note = fmt.Sprintf("workers %.0fµs cpu/job; %s", float64((k1-k0).Microseconds())/float64(n1-n0), note)
		}
		note = fmt.Sprintf("prefill %dk jobs; %s", (prefill+500)/1000, note)
		if fed > 0 {
			note = fmt.Sprintf("feeder ran: %d jobs inserted while measuring; %s", fed, note)
			progress("%s: %s: the queue fell below %d pending jobs; the feeder inserted %d jobs while measuring",
				e.kind, wc, cfg.queueDepth, fed)
		}
		if wc.procs == 1 {
			d.rep.trace(e.kind, wc.String(), e.trace.stop(n1-n0))
		}
		stop()
		ferr = f.halt()
	}
	if serr := stopWorkers(); err == nil {
		err = serr
	}
	if err == nil {
		err = ferr
	}
	if err == nil && rate == 0 {
		err = fmt.Errorf("no job ran in %s", cfg.duration)
	}
	if err == nil {
		d.noteRate(wc, rate)
	}
	return rate, note, err
}

// newWorker makes a worker; batch > 1 is group commit (WorkerOptions.BatchSize).
func newWorker(db *gorm.DB, concurrency, batch int, poll time.Duration) (*async.Worker, error) {
	return async.NewWorker(db, async.WorkerOptions{
		Concurrency:     concurrency,
		BatchSize:       batch,
		PollInterval:    poll,
		ShutdownTimeout: 10 * time.Second,
		Prefetch:        prefetch,
	})
}

// children is a set of child worker processes.
type children []*child

func (ks children) executed() int64 {
	var n int64
	for _, k := range ks {
		n += k.executed.Load()
	}
	return n
}

// cpu is the children's CPU time, as they last reported it.
func (ks children) cpu() time.Duration {
	var t time.Duration
	for _, k := range ks {
		t += time.Duration(k.cpuUS.Load()) * time.Microsecond
	}
	return t
}

func (ks children) stop() error {
	var first error
	for _, k := range ks {
		if err := k.stop(30 * time.Second); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// startWorkerChildren starts wc.procs child workers sharing wc.conc slots.
func (d *dbRun) startWorkerChildren(ctx context.Context, wc workerCase, poll time.Duration) (children, error) {
	var ks children
	for i := 0; i < wc.procs; i++ {
		c := wc.conc / wc.procs
		if i < wc.conc%wc.procs {
			c++
		}
		spec := childSpec{Mode: "worker", Kind: d.e.kind, DSN: d.e.dsn, Task: wc.task,
			Concurrency: c, BatchSize: wc.batch, PollInterval: poll, Prefetch: prefetch}
		if d.cfg.cpuprofile != "" && d.cfg.profileCases {
			spec.CPUProfile = d.profilePath(wc.String(), fmt.Sprintf(".child%d", i+1))
			spec.ProfileAfter, spec.ProfileFor = warmup(d.cfg.duration), d.cfg.duration
		}
		k, err := startChild(spec, nil)
		if err == nil {
			ks = append(ks, k)
			err = k.waitReady(ctx, 30*time.Second)
		}
		if err != nil {
			_ = ks.stop()
			return nil, err
		}
	}
	return ks, nil
}

// prefetch is WorkerOptions.Prefetch of every worker the bench makes (the
// -prefetch flag; a child process gets it in its spec).
var prefetch int
