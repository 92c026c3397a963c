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
	return e.bulkJobsAt(ctx, db, task, first, n, executed, nil)
}

// bulkJobsAt is bulkJobs with the jobs scheduled to run at scheduled (nil:
// as soon as possible).
func (e *env) bulkJobsAt(ctx context.Context, db *sql.DB, task string, first int64, n int, executed bool, scheduled *time.Time) error {
	now := time.Now()
	ts := e.timeLiteral(now)
	doneAt, result := "NULL", "''"
	if executed {
		doneAt, result = ts, "'null'"
	}
	at := "NULL"
	if scheduled != nil {
		at = e.timeLiteral(*scheduled)
	}
	var noopID string
	if task == taskNoop {
		noopID = textIdentity(taskNoop, nil)
	}
	const head = "INSERT INTO async_job (name, queue, args, kwargs, meta, result, priority, identity, added, scheduled, started, executed, attempts, max_attempts, locked_by) VALUES "
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
			fmt.Fprintf(&b, "('%s','default','%s','{}','{}',%s,5,'%s',%s,%s,%s,%s,%d,25,'')",
				task, args, result, ident, ts, at, doneAt, doneAt, attempts)
		}
		if _, err := db.ExecContext(ctx, b.String()); err != nil {
			return fmt.Errorf("%s: bulk insert: %w", e.kind, err)
		}
		done0 += k
	}
	return nil
}

// feeder tops the queue up while workers drain it: once fewer than low jobs
// are pending it inserts enough to bring them back to high. The throughput
// cases prefill the queue and use it only as a safety net (low is
// -queue-depth); the memory case relies on it to keep about -queue-depth jobs
// pending. It stops after limit jobs (0: no limit).
type feeder struct {
	e         *env
	db        *sql.DB
	task      string
	low, high int
	limit     int64
	executed  func() int64
	// inserted counts the jobs in the queue so far (prefilled ones
	// included); begun also counts those of a top-up still in flight.
	inserted atomic.Int64
	begun    atomic.Int64
	err      error
	stop     chan struct{}
	wg       sync.WaitGroup
}

// newFeeder makes a feeder for a queue that already holds have jobs of task
// (numbered 1..have for the insert task).
func newFeeder(e *env, db *sql.DB, task string, low, high int, have, limit int64, executed func() int64) *feeder {
	f := &feeder{e: e, db: db, task: task, low: low, high: high, limit: limit, executed: executed, stop: make(chan struct{})}
	f.inserted.Store(have)
	f.begun.Store(have)
	return f
}

// fill tops the queue up to high if fewer than low jobs are pending (or
// adds the last jobs up to the limit); it returns how many jobs it added.
func (f *feeder) fill(ctx context.Context) (int, error) {
	ins := f.inserted.Load()
	want := f.topUp(ins, f.executed())
	if want == 0 {
		return 0, nil
	}
	f.begun.Add(want)
	if err := f.e.bulkJobs(ctx, f.db, f.task, ins+1, int(want), false); err != nil {
		return 0, err
	}
	f.inserted.Add(want)
	return int(want), nil
}

// topUp is how many jobs fill adds when ins were inserted and executed ran.
func (f *feeder) topUp(ins, executed int64) int64 {
	pending := ins - executed
	want := int64(f.high) - pending
	if f.limit > 0 {
		want = min(want, f.limit-ins)
	}
	if want <= 0 || (pending >= int64(f.low) && !(f.limit > 0 && ins+want == f.limit)) {
		return 0
	}
	return want
}

// insertedSince is how many jobs the feeder inserted, in whole or in part,
// after the moment its inserted count was mark: a top-up in flight counts.
func (f *feeder) insertedSince(mark int64) int64 { return f.begun.Load() - mark }

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
