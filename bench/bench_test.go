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
