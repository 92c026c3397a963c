package main

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// sqlTrace (-sqltrace, Postgres only) is a pgx query tracer: during a
// measured window it adds up, per statement, how often it ran and how long
// the client waited for it. A CPU profile cannot show where a worker that
// waits on the database spends its time; this can. COMMITs are told apart
// by the statement before them on the same connection.
type sqlTrace struct {
	on    atomic.Bool
	mu    sync.Mutex
	last  map[*pgx.Conn]string
	stats map[string]*stmtStat
}

type stmtStat struct {
	n     int64
	total time.Duration
}

type traceKey struct{}

type traceStart struct {
	label string
	at    time.Time
}

func newSQLTrace() *sqlTrace {
	return &sqlTrace{last: map[*pgx.Conn]string{}, stats: map[string]*stmtStat{}}
}

// TraceQueryStart implements pgx.QueryTracer.
func (t *sqlTrace) TraceQueryStart(ctx context.Context, conn *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	l := label(data.SQL)
	switch l {
	case "commit", "rollback":
		t.mu.Lock()
		l += " (after " + t.last[conn] + ")"
		t.mu.Unlock()
	}
	return context.WithValue(ctx, traceKey{}, traceStart{l, time.Now()})
}

// TraceQueryEnd implements pgx.QueryTracer.
func (t *sqlTrace) TraceQueryEnd(ctx context.Context, conn *pgx.Conn, _ pgx.TraceQueryEndData) {
	st, ok := ctx.Value(traceKey{}).(traceStart)
	if !ok {
		return
	}
	d := time.Since(st.at)
	t.mu.Lock()
	defer t.mu.Unlock()
	if !strings.HasPrefix(st.label, "commit") && !strings.HasPrefix(st.label, "rollback") && st.label != "begin" {
		t.last[conn] = st.label
	}
	if t.on.Load() {
		s := t.stats[st.label]
		if s == nil {
			s = &stmtStat{}
			t.stats[st.label] = s
		}
		s.n++
		s.total += d
	}
}

var digitsRE = regexp.MustCompile(`[0-9]+`)

// label turns a statement into a short name; numbers become N, so that
// GORM's random savepoint names count as one statement. Only the head of
// the text is looked at: a ScheduleMany INSERT is hundreds of kilobytes.
func label(sql string) string {
	if len(sql) > 120 {
		sql = sql[:120]
	}
	s := digitsRE.ReplaceAllString(strings.Join(strings.Fields(sql), " "), "N")
	if len(s) > 48 {
		s = s[:48] + "..."
	}
	return s
}

// start clears the counts and starts counting.
func (t *sqlTrace) start() {
	if t == nil {
		return
	}
	t.mu.Lock()
	t.stats = map[string]*stmtStat{}
	t.mu.Unlock()
	t.on.Store(true)
}

// stop stops counting and returns a summary per job, longest first.
func (t *sqlTrace) stop(jobs int64) []string {
	if t == nil {
		return nil
	}
	t.on.Store(false)
	t.mu.Lock()
	defer t.mu.Unlock()
	type line struct {
		label string
		s     *stmtStat
	}
	var ls []line
	var sum time.Duration
	for k, s := range t.stats {
		ls = append(ls, line{k, s})
		sum += s.total
	}
	slices.SortFunc(ls, func(a, b line) int { return int(b.s.total - a.s.total) })
	out := []string{fmt.Sprintf("%.2f ms/job of connection time in %d statements", perJob(sum, jobs), len(ls))}
	for _, l := range ls {
		out = append(out, fmt.Sprintf("%6.2f ms/job  %5.2f/job  %6.2f ms each  %s",
			perJob(l.s.total, jobs), float64(l.s.n)/float64(max(jobs, 1)), float64(l.s.total)/float64(l.s.n)/1e6, l.label))
	}
	return out
}

func perJob(d time.Duration, jobs int64) float64 {
	return float64(d) / 1e6 / float64(max(jobs, 1))
}
