package async

import (
	"context"
	"time"

	"gorm.io/gorm"
)

// Outcome is how a run of a job ended.
type Outcome string

// Run outcomes reported to AfterRun hooks.
const (
	// OutcomeExecuted means the task succeeded; its writes committed with the job's completion.
	OutcomeExecuted Outcome = "executed"
	// OutcomeRetry means the task failed; its writes were rolled back, the error was
	// recorded and the job will run again later. If the database could not
	// be reached to record the error, Err still carries it, no error row is
	// written, and the job runs again once its lease expires (the attempt
	// counted).
	OutcomeRetry Outcome = "retry"
	// OutcomeFailed means the task failed and the job ended in the terminal failed state.
	OutcomeFailed Outcome = "failed"
	// OutcomeInterrupted means a shutdown cancelled the task; its writes were rolled
	// back and the job stays runnable, its attempt not counted.
	OutcomeInterrupted Outcome = "interrupted"
	// OutcomeSkipped means the job was not run, because it was cancelled or
	// another worker took over its claim before it started; or that its run
	// failed (Err) after either happened, so that no failure was recorded.
	OutcomeSkipped Outcome = "skipped"
)

// BeforeRunHook is called inside a job's transaction just before its task
// runs. The context it returns becomes the task's context, so a hook can add
// a tracing span or values.
type BeforeRunHook func(ctx context.Context, tx *gorm.DB, job *Job) context.Context

// AfterRunHook is called after a run has ended and its transaction is over.
type AfterRunHook func(ctx context.Context, info RunInfo)

// RunInfo describes one run of a job, for AfterRun hooks.
type RunInfo struct {
	// Job is the job as claimed (its Attempts count this run).
	Job *Job
	// Outcome is how the run ended.
	Outcome Outcome
	// Err is the task's error, nil when it succeeded.
	Err error
	// Started is when the run began; Duration how long it took.
	Started  time.Time
	Duration time.Duration
}
