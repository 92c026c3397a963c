package main

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Bulk loading: jobs go into async_job with raw multi-row INSERTs of literal
// values, much faster than scheduling them one by one. They are the rows
// async.Schedule would write (same columns, same identity), optionally
// already executed.

const bulkRowsPerStmt = 1000

// timeLiteral formats t the way each driver stores times.
func (e *env) timeLiteral(t time.Time) string {
	t = t.UTC()
	switch e.kind {
	case "postgres":
		return "'" + t.Format("2006-01-02 15:04:05.000000") + "+00'"
	case "mysql":
		return "'" + t.Format("2006-01-02 15:04:05.000000") + "'"
	}
	return "'" + t.Format("2006-01-02 15:04:05.999999999-07:00") + "'"
}

// bulkJobs inserts n jobs of task (taskNoop or taskInsert; the insert task
// gets arguments first, first+1, ...). Executed jobs are finished rows, as a
// worker leaves them.
func (e *env) bulkJobs(ctx context.Context, db *sql.DB, task string, first int64, n int, executed bool) error {
	now := time.Now()
	ts := e.timeLiteral(now)
	doneAt, result := "NULL", "''"
	if executed {
		doneAt, result = ts, "'null'"
	}
	var noopID string
	if task == taskNoop {
		noopID = textIdentity(taskNoop, nil)
	}
	const head = "INSERT INTO async_job (name, queue, args, kwargs, meta, result, priority, identity, added, started, executed, attempts, max_attempts, locked_by) VALUES "
	var b strings.Builder
	for done0 := 0; done0 < n; {
		k := min(bulkRowsPerStmt, n-done0)
		b.Reset()
		b.WriteString(head)
		for i := 0; i < k; i++ {
			if i > 0 {
				b.WriteByte(',')
			}
			args, ident := "[]", noopID
			if task != taskNoop {
				v := first + int64(done0+i)
				args, ident = fmt.Sprintf("[%d]", v), textIdentity(task, &v)
			}
			attempts := 0
			if executed {
				attempts = 1
			}
			fmt.Fprintf(&b, "('%s','default','%s','{}','{}',%s,5,'%s',%s,%s,%s,%d,25,'')",
				task, args, result, ident, ts, doneAt, doneAt, attempts)
		}
		if _, err := db.ExecContext(ctx, b.String()); err != nil {
			return fmt.Errorf("%s: bulk insert: %w", e.kind, err)
		}
		done0 += k
	}
	return nil
}

// feeder keeps about depth jobs pending while workers drain the queue, so a
// throughput case never runs dry and the queue depth stays the same across
// cases. It stops after limit jobs (0: no limit).
type feeder struct {
	e        *env
	db       *sql.DB
	task     string
	depth    int
	limit    int64
	executed func() int64
	inserted atomic.Int64
	err      error
	stop     chan struct{}
	wg       sync.WaitGroup
}

func newFeeder(e *env, db *sql.DB, task string, depth int, limit int64, executed func() int64) *feeder {
	return &feeder{e: e, db: db, task: task, depth: depth, limit: limit, executed: executed, stop: make(chan struct{})}
}

// fill tops the queue up to depth; it returns how many jobs it added.
func (f *feeder) fill(ctx context.Context) (int, error) {
	ins := f.inserted.Load()
	want := int64(f.depth) - (ins - f.executed())
	if f.limit > 0 {
		want = min(want, f.limit-ins)
	}
	// Top up in whole statements, and only once a fifth of the depth is gone,
	// so that the feeder's writes stay a small share of the load.
	if want < int64(max(f.depth/5, 1)) && !(f.limit > 0 && want > 0 && ins+want == f.limit) {
		return 0, nil
	}
	if err := f.e.bulkJobs(ctx, f.db, f.task, ins+1, int(want), false); err != nil {
		return 0, err
	}
	f.inserted.Add(want)
	return int(want), nil
}

// start fills the queue, then keeps it filled in the background until halt.
func (f *feeder) start(ctx context.Context) error {
	if _, err := f.fill(ctx); err != nil {
		return err
	}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-f.stop:
				return
			case <-ctx.Done():
				return
			case <-t.C:
				if _, err := f.fill(ctx); err != nil {
					if ctx.Err() == nil {
						f.err = err
					}
					return
				}
			}
		}
	}()
	return nil
}

// halt stops the background filling and returns its error, if any.
func (f *feeder) halt() error {
	close(f.stop)
	f.wg.Wait()
	return f.err
}
