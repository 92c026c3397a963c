package main

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

// row is one figure of the report.
type row struct {
	DB        string  `json:"db"`
	Case      string  `json:"case"`
	Value     float64 `json:"value"`
	Unit      string  `json:"unit"`
	Baseline  string  `json:"baseline,omitempty"`
	BaseValue float64 `json:"baseline_value,omitempty"`
	Ratio     float64 `json:"ratio,omitempty"`
	Target    string  `json:"target,omitempty"`
	Met       *bool   `json:"met,omitempty"`
	Note      string  `json:"note,omitempty"`
}

// target is a goal of the issue: the value or the ratio against a bound.
type target struct {
	onRatio bool
	atLeast bool
	bound   float64
	unit    string
}

func ratioAtLeast(x float64) *target { return &target{onRatio: true, atLeast: true, bound: x} }
func ratioAtMost(x float64) *target  { return &target{onRatio: true, bound: x} }
func valueAtLeast(x float64, unit string) *target {
	return &target{atLeast: true, bound: x, unit: unit}
}
func valueAtMost(x float64, unit string) *target { return &target{bound: x, unit: unit} }

func (t *target) String() string {
	op := "<="
	if t.atLeast {
		op = ">="
	}
	if t.onRatio {
		return fmt.Sprintf("%s %sx", op, trimFloat(t.bound))
	}
	return fmt.Sprintf("%s %s %s", op, trimFloat(t.bound), t.unit)
}

func (t *target) met(r *row) bool {
	v := r.Value
	if t.onRatio {
		v = r.Ratio
	}
	if t.atLeast {
		return v >= t.bound
	}
	return v <= t.bound
}

// report collects rows from the cases, in order.
type report struct {
	mu      sync.Mutex
	Started time.Time         `json:"started"`
	Command string            `json:"command"`
	Machine string            `json:"machine"`
	Servers map[string]string `json:"servers"`
	Rows    []*row            `json:"rows"`
	Errors  []string          `json:"errors,omitempty"`
	// Traces are -sqltrace summaries by "db: case".
	Traces map[string][]string `json:"sql_traces,omitempty"`
}

func newReport() *report {
	host, _ := os.Hostname()
	return &report{
		Started: time.Now(),
		Command: strings.Join(os.Args, " "),
		Machine: fmt.Sprintf("%s %s/%s, %d CPUs, %s", host, runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), runtime.Version()),
		Servers: map[string]string{},
	}
}

// add appends a figure. base may be nil (no baseline); with a baseline the
// ratio is value/base. The figure meets its targets when it meets them all.
func (r *report) add(db, name string, value float64, unit string, base *row, note string, tgts ...*target) *row {
	x := &row{DB: db, Case: name, Value: value, Unit: unit, Note: note}
	if base != nil && base.Value > 0 {
		x.Baseline, x.BaseValue, x.Ratio = base.Case, base.Value, value/base.Value
	}
	var texts []string
	judged, ok := true, true
	for _, t := range tgts {
		if t == nil {
			continue
		}
		texts = append(texts, t.String())
		if t.onRatio && x.Baseline == "" {
			judged = false
			continue
		}
		ok = ok && t.met(x)
	}
	if len(texts) > 0 {
		x.Target = strings.Join(texts, " and ")
		if judged {
			x.Met = &ok
		}
	}
	r.mu.Lock()
	r.Rows = append(r.Rows, x)
	r.mu.Unlock()
	progress("%s: %-44s %s", db, name, formatValue(value, unit)+ratioText(x))
	return x
}

func (r *report) fail(db, what string, err error) {
	r.mu.Lock()
	r.Errors = append(r.Errors, fmt.Sprintf("%s: %s: %v", db, what, err))
	r.mu.Unlock()
	progress("%s: %s FAILED: %v", db, what, err)
}

func ratioText(x *row) string {
	if x.Baseline == "" {
		return ""
	}
	return fmt.Sprintf("  (%.2fx %s)", x.Ratio, x.Baseline)
}

func (r *report) writeJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

func (r *report) writeTable(w io.Writer) {
	fmt.Fprintf(w, "async bench, %s\n%s\n", r.Started.Format(time.RFC3339), r.Machine)
	for db, v := range r.Servers {
		fmt.Fprintf(w, "%s: %s\n", db, v)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "db\tcase\tvalue\tbaseline\tratio\ttarget\tmet?\tnote")
	for _, x := range r.Rows {
		val, base, ratio, met := "-", "-", "-", ""
		if x.Unit != "-" {
			val = formatValue(x.Value, x.Unit)
		}
		if x.Baseline != "" {
			base = x.Baseline + " = " + formatValue(x.BaseValue, x.Unit)
			ratio = fmt.Sprintf("%.2fx", x.Ratio)
		}
		if x.Met != nil {
			met = map[bool]string{true: "yes", false: "NO"}[*x.Met]
		} else if x.Target != "" {
			met = "n/a"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", x.DB, x.Case, val, base, ratio, x.Target, met, x.Note)
	}
	_ = tw.Flush()
	for _, e := range r.Errors {
		fmt.Fprintln(w, "error:", e)
	}
	keys := slices.Sorted(maps.Keys(r.Traces))
	for _, k := range keys {
		fmt.Fprintf(w, "\nSQL trace, %s: client wait per job by statement\n", k)
		for _, l := range r.Traces[k] {
			fmt.Fprintln(w, "  "+l)
		}
	}
}

// trace records a -sqltrace summary.
func (r *report) trace(db, name string, lines []string) {
	if len(lines) == 0 {
		return
	}
	r.mu.Lock()
	if r.Traces == nil {
		r.Traces = map[string][]string{}
	}
	r.Traces[db+": "+name] = lines
	r.mu.Unlock()
	progress("%s: %s: sql trace\n    %s", db, name, strings.Join(lines, "\n    "))
}

func formatValue(v float64, unit string) string {
	switch {
	case math.IsNaN(v):
		return "NaN " + unit
	case math.Abs(v) >= 100:
		return fmt.Sprintf("%.0f %s", v, unit)
	case math.Abs(v) >= 10:
		return fmt.Sprintf("%.1f %s", v, unit)
	}
	return fmt.Sprintf("%.2f %s", v, unit)
}

func trimFloat(f float64) string {
	s := fmt.Sprintf("%.2f", f)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	return s
}

var progressStart = time.Now()

// progress prints a line on stderr, prefixed by the time since start.
func progress(format string, a ...any) {
	d := time.Since(progressStart).Truncate(time.Second)
	fmt.Fprintf(os.Stderr, "[%8s] %s\n", d, fmt.Sprintf(format, a...))
}
