// Command bench measures the async job queue on SQLite, PostgreSQL and
// MySQL/MariaDB: scheduling rate, worker throughput, pickup latency, claim
// cost as the table grows and worker memory, each next to a baseline measured
// in the same run (pgbench -N, raw database/sql loops), because the machines
// it runs on are shared and absolute numbers are noisy.
//
//	go run ./bench -db postgres -duration 5s
//	go run ./bench -quick -json > results.json
//
// Progress goes to stderr; the table (or, with -json, the JSON) to stdout.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// allCases are the case groups -cases selects from, in run order.
var allCases = []string{"schedule", "worker", "latency", "claim", "rss"}

type config struct {
	dbs            []string
	pgDSN, myDSN   string
	duration       time.Duration
	quick          bool
	cases          []string
	conc           []int // worker and producer concurrencies
	pgbenchClients []int
	schedBatch     int // jobs per transaction in the many-in-one-tx case
	batchK         int // group commit size for WorkerOptions.BatchSize
	queueDepth     int // throughput cases: least prefill and the feeder's low-water mark; rss: pending jobs kept
	rssJobs        int
	rssBatch       int   // BatchSize of the memory case's worker
	claimRows      []int // finished rows in the claim-cost case
	claimJobs      int   // no-op jobs run per claim-cost measurement
	latencyGap     time.Duration
	jsonOut        bool
	cpuprofile     string
	profileCases   bool
	sqlTrace       bool
	afterMigrate   []string // what-if statements run after each migration
	scratch        string
	keep           bool
	workerOnly     *regexp.Regexp // worker cases run: those whose name matches
}

func (c *config) has(name string) bool { return slices.Contains(c.cases, name) }

func parseFlags(args []string) (*config, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	c := &config{}
	dbs := fs.String("db", "sqlite,postgres,mysql", "databases to run, comma-separated: sqlite,postgres,mysql")
	fs.StringVar(&c.pgDSN, "pg-dsn", envOr("ASYNC_POSTGRES_DSN", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"),
		"PostgreSQL DSN to start from (its server gets the scratch database)")
	fs.StringVar(&c.myDSN, "mysql-dsn", envOr("ASYNC_MYSQL_DSN", "root@tcp(127.0.0.1:3306)/test?parseTime=true&loc=UTC"),
		"MySQL/MariaDB DSN to start from (its server gets the scratch database)")
	fs.DurationVar(&c.duration, "duration", 5*time.Second, "measuring time per case")
	fs.BoolVar(&c.quick, "quick", false, "short run: 1s cases, fewer concurrencies, small tables")
	cases := fs.String("cases", strings.Join(allCases, ","), "case groups to run: "+strings.Join(allCases, ","))
	conc := fs.String("conc", "1,4,8,16", "worker/producer concurrencies (the one that maximises pgbench is added)")
	pgc := fs.String("pgbench-clients", "1,4,8,16,32", "pgbench -N client counts")
	fs.IntVar(&c.schedBatch, "sched-batch", 1000, "jobs per transaction in the many-in-one-tx scheduling case")
	fs.IntVar(&prefetch, "prefetch", 0, "WorkerOptions.Prefetch of the workers (0: the default; negative: none)")
	fs.IntVar(&c.batchK, "batch", 256, "WorkerOptions.BatchSize for the group-commit cases (1: strict mode only)")
	fs.IntVar(&c.queueDepth, "queue-depth", 2000, "throughput cases: least jobs prefilled, and the pending count below which the safety-net feeder tops up; rss case: pending jobs kept")
	fs.IntVar(&c.rssJobs, "rss-jobs", 1_000_000, "no-op jobs run in the worker memory case")
	fs.IntVar(&c.rssBatch, "rss-batch", 16, "WorkerOptions.BatchSize in the worker memory case (1: strict mode, much slower)")
	claimRows := fs.String("claim-rows", "10000,1000000", "finished rows in the table for the claim-cost case")
	fs.IntVar(&c.claimJobs, "claim-jobs", 1000, "no-op jobs run per claim-cost measurement")
	fs.DurationVar(&c.latencyGap, "latency-gap", 20*time.Millisecond, "gap between the producer's commits in the latency case")
	fs.BoolVar(&c.jsonOut, "json", false, "print JSON on stdout instead of the table")
	fs.StringVar(&c.cpuprofile, "cpuprofile", "", "write a CPU profile of the whole run to this file")
	fs.BoolVar(&c.profileCases, "profile-cases", false, "with -cpuprofile: one profile per case, FILE.<db>.<case>.prof (a child worker's: FILE.<db>.<case>.child<N>.prof)")
	fs.BoolVar(&c.sqlTrace, "sqltrace", false, "Postgres: break in-process cases down by statement (client wait per job)")
	afterMigrate := fs.String("after-migrate", "", "what-if: SQL statements (separated by ;) run after the library migrates, e.g. a proposed index")
	fs.StringVar(&c.scratch, "scratch", "async_bench", "name of the scratch database created on each server")
	fs.BoolVar(&c.keep, "keep", false, "keep the scratch databases at the end")
	workerOnly := fs.String("worker-only", "", "run only the worker cases whose name matches this regular expression, e.g. 'insert c=16 procs=2 K=256' (their baselines still run)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	c.dbs = splitList(*dbs)
	for _, d := range c.dbs {
		if !slices.Contains([]string{"sqlite", "postgres", "mysql"}, d) {
			return nil, fmt.Errorf("-db: unknown database %q", d)
		}
	}
	for _, s := range strings.Split(*afterMigrate, ";") {
		if s = strings.TrimSpace(s); s != "" {
			c.afterMigrate = append(c.afterMigrate, s)
		}
	}
	if c.workerOnly, err = regexp.Compile(*workerOnly); err != nil {
		return nil, fmt.Errorf("-worker-only: %w", err)
	}
	c.cases = splitList(*cases)
	for _, k := range c.cases {
		if !slices.Contains(allCases, k) {
			return nil, fmt.Errorf("-cases: unknown case %q (have %s)", k, strings.Join(allCases, ","))
		}
	}
	if c.conc, err = intList(*conc); err != nil {
		return nil, fmt.Errorf("-conc: %w", err)
	}
	if c.pgbenchClients, err = intList(*pgc); err != nil {
		return nil, fmt.Errorf("-pgbench-clients: %w", err)
	}
	if c.claimRows, err = intList(*claimRows); err != nil {
		return nil, fmt.Errorf("-claim-rows: %w", err)
	}
	if c.quick {
		quickDefaults(c, set)
	}
	if c.duration <= 0 || c.schedBatch < 1 || c.batchK < 1 || c.queueDepth < 1 || c.rssJobs < 1 || c.rssBatch < 1 || c.claimJobs < 1 || len(c.claimRows) == 0 {
		return nil, errors.New("durations and sizes must be positive")
	}
	return c, nil
}

// quickDefaults shrinks what the user did not set explicitly.
func quickDefaults(c *config, set map[string]bool) {
	if !set["duration"] {
		c.duration = time.Second
	}
	if !set["conc"] {
		c.conc = []int{1, 8}
	}
	if !set["pgbench-clients"] {
		c.pgbenchClients = []int{1, 8}
	}
	if !set["rss-jobs"] {
		c.rssJobs = 20_000
	}
	if !set["claim-rows"] {
		c.claimRows = []int{10_000, 100_000}
	}
	if !set["claim-jobs"] {
		c.claimJobs = 200
	}
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func intList(s string) ([]int, error) {
	var out []int
	for _, f := range splitList(s) {
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a positive integer", f)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, errors.New("empty list")
	}
	return out, nil
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == childFlag {
		os.Exit(childMain(os.Args[2:]))
	}
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := run(ctx, cfg)
	if rep != nil {
		if cfg.jsonOut {
			err = errors.Join(err, rep.writeJSON(os.Stdout))
		} else {
			rep.writeTable(os.Stdout)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}
