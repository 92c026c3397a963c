package async_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// startWorker runs a worker until the test ends (or stop is called) and
// checks that Run returned.
func startWorker(t *testing.T, db *gorm.DB, o async.WorkerOptions) (stop func()) {
	t.Helper()
	return startWorkerWith(t, db, o, nil)
}

// startWorkerWith is startWorker with before, if not nil, given the worker
// before it runs (to set what only tests set).
func startWorkerWith(t *testing.T, db *gorm.DB, o async.WorkerOptions, before func(*async.Worker)) (stop func()) {
	t.Helper()
	w, err := async.NewWorker(db, o)
	require.NoError(t, err)
	if before != nil {
		before(w)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- w.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			require.NoError(t, <-errc)
		})
	}
	t.Cleanup(stop)
	return stop
}

// waitFor polls cond until it holds, failing the test after the timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Point 1 (goroutines): N concurrent workers run each of M jobs exactly once.
func TestWorkersRunEachJobExactlyOnce(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		const m = 60
		prefix := fmt.Sprintf("w-%s-%d-", d.Kind, time.Now().UnixNano())
		for i := 0; i < m; i++ {
			_, err := async.Schedule(d.DB, writeEffect, async.Args(fmt.Sprintf("%s%d", prefix, i), i))
			require.NoError(t, err)
		}
		var stops []func()
		for i := 0; i < 3; i++ {
			stops = append(stops, startWorker(t, d.DB, async.WorkerOptions{Concurrency: 4, PollInterval: 20 * time.Millisecond}))
		}
		waitFor(t, 60*time.Second, "all jobs executed", func() bool {
			return count(t, d.DB, "async_job", "executed IS NOT NULL") == m
		})
		for _, s := range stops {
			s()
		}
		assert.EqualValues(t, m, count(t, d.DB, "effects", "k LIKE ?", prefix+"%"))
		assert.Zero(t, count(t, d.DB, "async_error", ""))
		for i := 0; i < m; i++ {
			assert.EqualValues(t, 1, runCount(fmt.Sprintf("%s%d", prefix, i)))
		}
	})
}
