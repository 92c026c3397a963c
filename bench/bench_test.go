package main

import (
	"math"
	"testing"
	"time"
)

// Tests of the bench's pure helpers; nothing here times anything or needs
// a database.

func TestPercentiles(t *testing.T) {
	xs := []float64{5, 1, 4, 2, 3, 6, 7, 8, 9, 10}
	got := percentiles(xs, 0.5, 0.9, 0.99, 1)
	want := []float64{5, 9, 10, 10}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("percentiles = %v, want %v", got, want)
		}
	}
	if xs[0] != 5 {
		t.Fatal("percentiles sorted its input")
	}
	if !math.IsNaN(percentiles(nil, 0.5)[0]) {
		t.Fatal("percentile of nothing should be NaN")
	}
}

func TestTargets(t *testing.T) {
	r := newReport()
	base := r.add("postgres", "base", 100, "tx/s", nil, "")
	ok := r.add("postgres", "fast", 150, "jobs/s", base, "", ratioAtLeast(1), valueAtLeast(120, "jobs/s"))
	if ok.Met == nil || !*ok.Met || ok.Ratio != 1.5 {
		t.Fatalf("fast: met=%v ratio=%v", ok.Met, ok.Ratio)
	}
	slow := r.add("postgres", "slow", 90, "jobs/s", base, "", ratioAtLeast(1))
	if slow.Met == nil || *slow.Met {
		t.Fatal("slow should miss its target")
	}
	noBase := r.add("postgres", "alone", 90, "ms", nil, "", ratioAtMost(1.5))
	if noBase.Met != nil {
		t.Fatal("a ratio target without a baseline cannot be judged")
	}
	if got := valueAtMost(25, "ms").String(); got != "<= 25 ms" {
		t.Fatalf("target text %q", got)
	}
}

func TestParseFlagsQuick(t *testing.T) {
	c, err := parseFlags([]string{"-quick", "-db", "postgres", "-cases", "worker,claim"})
	if err != nil {
		t.Fatal(err)
	}
	if c.duration != time.Second || len(c.conc) != 2 || c.claimRows[1] != 100_000 {
		t.Fatalf("quick defaults not applied: %+v", c)
	}
	if !c.has("worker") || c.has("rss") {
		t.Fatalf("cases: %v", c.cases)
	}
	if _, err := parseFlags([]string{"-db", "oracle"}); err == nil {
		t.Fatal("unknown database accepted")
	}
	if _, err := parseFlags([]string{"-conc", "1,0"}); err == nil {
		t.Fatal("zero concurrency accepted")
	}
}

func TestSQLLabel(t *testing.T) {
	if got := label("SAVEPOINT sp123456"); got != "SAVEPOINT spN" {
		t.Fatalf("label = %q", got)
	}
	if got := label("UPDATE  async_job\n SET started = $1"); got != "UPDATE async_job SET started = $N" {
		t.Fatalf("label = %q", got)
	}
}

func TestTextIdentity(t *testing.T) {
	// SHA-1 of "bench.noop()", as the library computes identities.
	if got := textIdentity(taskNoop, nil); len(got) != 40 {
		t.Fatalf("identity %q", got)
	}
	a, b := int64(1), int64(2)
	if textIdentity(taskInsert, &a) == textIdentity(taskInsert, &b) {
		t.Fatal("different arguments, same identity")
	}
}

func TestFeederTopUp(t *testing.T) {
	// The throughput cases' safety net: nothing until fewer than low are
	// pending, then back up to high.
	f := &feeder{low: 2000, high: 4000}
	for _, c := range []struct{ ins, executed, want int64 }{
		{100_000, 0, 0},
		{100_000, 98_000, 0},
		{100_000, 98_001, 2001},
		{100_000, 100_000, 4000},
	} {
		if got := f.topUp(c.ins, c.executed); got != c.want {
			t.Errorf("topUp(%d, %d) = %d, want %d", c.ins, c.executed, got, c.want)
		}
	}
	// The memory case's feeder: about depth pending, topped up once a fifth
	// is gone, and the last jobs up to the limit whatever their number.
	f = &feeder{low: 2000 - 400 + 1, high: 2000, limit: 10_000}
	for _, c := range []struct{ ins, executed, want int64 }{
		{2000, 0, 0},
		{2000, 399, 0},
		{2000, 400, 400},
		{9_900, 8_000, 100},
		{10_000, 9_999, 0},
	} {
		if got := f.topUp(c.ins, c.executed); got != c.want {
			t.Errorf("limited topUp(%d, %d) = %d, want %d", c.ins, c.executed, got, c.want)
		}
	}
}

func TestPrefillSize(t *testing.T) {
	d := &dbRun{runner: &runner{cfg: &config{duration: 3 * time.Second, queueDepth: 2000}}}
	strict := workerCase{task: taskNoop, conc: 8, procs: 1, batch: 1}
	group := workerCase{task: taskNoop, conc: 8, procs: 1, batch: 64}
	// -queue-depth, plus the estimated rate over the warm-up (600ms) and
	// the 3s window, times 1.5: 5.4 s of the rate.
	if n, est := d.prefillSize(strict); est != defaultStrictRate || n != 2000+64800 {
		t.Fatalf("strict default: %d jobs at %v jobs/s", n, est)
	}
	if n, _ := d.prefillSize(group); n != 2000+270000 {
		t.Fatalf("group default: %d jobs", n)
	}
	d.noteRate(group, 30000)
	if n, est := d.prefillSize(group); est != 30000 || n != 2000+162000 {
		t.Fatalf("group after a case: %d jobs at %v jobs/s", n, est)
	}
	if _, est := d.prefillSize(workerCase{task: taskInsert, conc: 8, procs: 2, batch: 64}); est != defaultGroupRate {
		t.Fatal("the insert task took the no-op task's rate")
	}
	if _, est := d.prefillSize(workerCase{task: taskNoop, conc: 16, procs: 2, batch: 1}); est != defaultStrictRate {
		t.Fatal("strict mode took group commit's rate")
	}
	// At twice the concurrency, twice the rate is expected; at a lower one,
	// the same; at a much higher one, at most twice.
	for conc, want := range map[int]float64{16: 60000, 4: 30000, 64: 60000} {
		if _, est := d.prefillSize(workerCase{task: taskNoop, conc: conc, procs: 1, batch: 64}); est != want {
			t.Errorf("group at c=%d after c=8 at 30000 jobs/s: %v jobs/s expected, want %v", conc, est, want)
		}
	}
	// MySQL starts from the same defaults: a deeper queue no longer slows
	// its claims.
	my := &dbRun{runner: d.runner, e: &env{kind: "mysql"}}
	if _, est := my.prefillSize(group); est != defaultGroupRate {
		t.Fatalf("mysql group default: %v jobs/s", est)
	}
	if _, est := my.prefillSize(strict); est != defaultStrictRate {
		t.Fatalf("mysql strict default: %v jobs/s", est)
	}
	// A slow case brings the estimate down: -queue-depth is the least.
	d.noteRate(strict, 100)
	if n, est := d.prefillSize(strict); est != 100 || n != 2000+540 {
		t.Fatalf("strict after a slow case: %d jobs at %v jobs/s", n, est)
	}
}
