package main

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Task names are fixed strings so that the bench, its child processes and
// the rows it bulk-loads agree on them.
const (
	taskNoop    = "bench.noop"
	taskInsert  = "bench.insert"
	taskLatency = "bench.latency"
)

func init() {
	must(async.RegisterAs(taskNoop, noopTask))
	must(async.RegisterAs(taskInsert, insertTask))
	must(async.RegisterAs(taskLatency, latencyTask))
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

func noopTask(context.Context, *gorm.DB) error { return nil }

// insertTask writes one row in the job's transaction: the smallest real task.
func insertTask(_ context.Context, tx *gorm.DB, n int64) error {
	return tx.Exec("INSERT INTO bench_effect (n) VALUES (?)", n).Error
}

// latencyTask records when its run started, for the pickup-latency case.
func latencyTask(_ context.Context, _ *gorm.DB, seq int) error {
	starts.record(seq, time.Now())
	return nil
}

// startLog collects the start times of latency jobs by sequence number.
type startLog struct {
	mu sync.Mutex
	at map[int]time.Time
}

var starts startLog

func (s *startLog) reset() {
	s.mu.Lock()
	s.at = map[int]time.Time{}
	s.mu.Unlock()
}

func (s *startLog) record(seq int, t time.Time) {
	s.mu.Lock()
	if s.at != nil {
		if _, dup := s.at[seq]; !dup {
			s.at[seq] = t
		}
	}
	s.mu.Unlock()
}

func (s *startLog) get(seq int) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.at[seq]
	return t, ok
}

func (s *startLog) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.at)
}

// countingPlugin is the plugin with an AfterRun hook that counts executed
// jobs into n: the throughput counter of in-process workers.
func countingPlugin(n *atomic.Int64, skipMigration bool) *async.Plugin {
	return &async.Plugin{
		SkipMigration: skipMigration,
		AfterRun: func(_ context.Context, info async.RunInfo) {
			if info.Outcome == async.OutcomeExecuted {
				n.Add(1)
			}
		},
	}
}

// textIdentity is what the library stores in async_job.identity: the SHA-1
// of the job's text form. For the bench's tasks (no arguments, or one
// integer) the text form is simple enough to write here.
func textIdentity(task string, arg *int64) string {
	form := task + "()"
	if arg != nil {
		form = fmt.Sprintf("%s(%d)", task, *arg)
	}
	sum := sha1.Sum([]byte(form))
	return hex.EncodeToString(sum[:])
}
