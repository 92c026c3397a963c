package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime/pprof"
	"slices"
	"strings"
)

// runner carries what the cases share.
type runner struct {
	cfg *config
	rep *report
}

// dbRun is the state of one database's part of the run.
type dbRun struct {
	*runner
	e *env
	// tput are the throughput baselines by concurrency (pgbench -N TPS on
	// Postgres, the raw one-row-update-and-commit loop elsewhere), and best
	// the concurrency that maximises them.
	tput map[int]*row
	best int
	// rates are the worker throughput cases' last rates, by kind of case:
	// what sizes the next prefill (see rateEstimate).
	rates map[rateKey]pastRate
}

func run(ctx context.Context, cfg *config) (*report, error) {
	r := &runner{cfg: cfg, rep: newReport()}
	if cfg.cpuprofile != "" && !cfg.profileCases {
		stop, err := startProfile(cfg.cpuprofile)
		if err != nil {
			return nil, err
		}
		defer stop()
	}
	var errs []error
	for _, kind := range cfg.dbs {
		if ctx.Err() != nil {
			break
		}
		e, err := openEnv(ctx, cfg, kind)
		if err != nil {
			r.rep.fail(kind, "opening the scratch database", err)
			errs = append(errs, err)
			continue
		}
		r.rep.Servers[kind] = e.version
		progress("%s: %s, scratch database ready", kind, e.version)
		d := &dbRun{runner: r, e: e, tput: map[int]*row{}}
		if err := d.all(ctx); err != nil && ctx.Err() == nil {
			errs = append(errs, fmt.Errorf("%s: %w", kind, err))
		}
		e.close(cfg.keep)
	}
	if err := ctx.Err(); err != nil {
		errs = append(errs, err)
	}
	return r.rep, errors.Join(errs...)
}

// all runs the selected cases on one database. A failing case is reported
// and the next one runs; only cancellation stops the database's run.
func (d *dbRun) all(ctx context.Context) error {
	cfg := d.cfg
	steps := []struct {
		name string
		on   bool
		fn   func(context.Context) error
	}{
		{"throughput baseline", cfg.has("worker") || cfg.has("schedule"), d.throughputBaseline},
		{"schedule", cfg.has("schedule"), d.scheduleCases},
		{"worker", cfg.has("worker"), d.workerCases},
		{"latency", cfg.has("latency"), d.latencyCases},
		{"claim", cfg.has("claim"), d.claimCases},
		{"rss", cfg.has("rss"), d.rssCase},
	}
	for _, s := range steps {
		if !s.on {
			continue
		}
		if err := s.fn(ctx); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			d.rep.fail(d.e.kind, s.name, err)
		}
	}
	return nil
}

// throughputBaseline measures the baseline at each concurrency and picks
// the concurrency that maximises it.
func (d *dbRun) throughputBaseline(ctx context.Context) error {
	clients := d.cfg.conc
	if d.e.kind == "postgres" {
		clients = d.cfg.pgbenchClients
		if err := d.e.reset(ctx); err != nil {
			return err
		}
		if err := pgbenchInit(ctx, d.e); err != nil {
			return err
		}
	}
	for _, c := range clients {
		b, err := d.measureBase(ctx, c, "")
		if err != nil {
			return err
		}
		d.tput[c] = b
		if d.best == 0 || b.Value > d.tput[d.best].Value {
			d.best = c
		}
	}
	d.tput[d.best].Note = "baseline; maximum"
	return nil
}

// measureBase measures the throughput baseline at concurrency c: pgbench
// -N on Postgres, the raw one-row-update-and-commit loop elsewhere.
func (d *dbRun) measureBase(ctx context.Context, c int, suffix string) (*row, error) {
	var v float64
	var err error
	name := fmt.Sprintf("raw update+commit c=%d", c)
	s0 := takeCPU()
	if d.e.kind == "postgres" {
		name = fmt.Sprintf("pgbench -N c=%d", c)
		v, err = pgbenchTPS(ctx, d.e, c, d.cfg.duration)
	} else {
		v, err = rawUpdateRate(ctx, d.e, c, d.cfg.duration)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	// Its transactions, for the server's CPU per transaction: the rate over
	// the measuring time (the window also holds the loop's setup).
	note := "baseline; " + cpuNote(s0, takeCPU(), int64(v*d.cfg.duration.Seconds()), false)
	return d.rep.add(d.e.kind, name+suffix, v, "tx/s", nil, note), nil
}

// concurrencies are the worker concurrencies: -conc plus the best one.
func (d *dbRun) concurrencies() []int {
	cs := slices.Clone(d.cfg.conc)
	if d.best > 0 && !slices.Contains(cs, d.best) {
		cs = append(cs, d.best)
	}
	slices.Sort(cs)
	return cs
}

// profileCase starts a per-case CPU profile when asked to; stop ends it.
func (d *dbRun) profileCase(name string) (stop func()) {
	if d.cfg.cpuprofile == "" || !d.cfg.profileCases {
		return func() {}
	}
	stop, err := startProfile(d.profilePath(name, ""))
	if err != nil {
		progress("cpuprofile: %v", err)
		return func() {}
	}
	return stop
}

// profilePath is where the CPU profile of case name goes (suffix: of a
// child process, e.g. ".child1").
func (d *dbRun) profilePath(name, suffix string) string {
	clean := strings.NewReplacer(" ", "_", "=", "", "/", "_", ",", "_").Replace(name)
	return fmt.Sprintf("%s.%s.%s%s.prof", d.cfg.cpuprofile, d.e.kind, clean, suffix)
}

func startProfile(path string) (func(), error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}
