package main

import (
	"time"

	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Library features that are on their way to main. When async.ScheduleMany
// and WorkerOptions.BatchSize land, switch them on here (the two functions
// marked SWITCH) and set the constants to true; nothing else in the bench
// changes: the cases that need them are already in the run plan and are
// skipped, with a note in the table, while these are false.

const (
	haveScheduleMany = false // SWITCH: true once async.ScheduleMany exists
	haveBatchSize    = false // SWITCH: true once WorkerOptions.BatchSize exists
)

// scheduleMany schedules n no-op jobs through tx. SWITCH: once the library
// has it, call async.ScheduleMany here (one statement for all n jobs).
func scheduleMany(tx *gorm.DB, task string, n int) error {
	for i := 0; i < n; i++ {
		if _, err := async.Schedule(tx, task); err != nil {
			return err
		}
	}
	return nil
}

// newWorker makes a worker for a throughput case. batch > 1 asks for group
// commit. SWITCH: once the library has it, set o.BatchSize = batch.
func newWorker(db *gorm.DB, concurrency, batch int, poll time.Duration) (*async.Worker, error) {
	o := async.WorkerOptions{
		Concurrency:     concurrency,
		PollInterval:    poll,
		ShutdownTimeout: 10 * time.Second,
	}
	_ = batch
	return async.NewWorker(db, o)
}
