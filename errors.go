package async

import (
	"errors"
	"fmt"
)

// Sentinel errors. The errors this package returns for a caller's mistake or
// a job's outcome wrap one of these, and any error they were caused by (a
// JSON encoding error, the database driver's error), so callers can test
// them with errors.Is and errors.As. Errors from the database itself are
// returned wrapped with what the library was doing; a task's own error, as
// FlushQueue and Job.Execute return it, is the task's.
var (
	// ErrNilDB is returned when a nil *gorm.DB handle is passed.
	ErrNilDB = errors.New("async: nil *gorm.DB handle")
	// ErrNotInstalled is returned when the handle's gorm.DB has no async.Plugin.
	ErrNotInstalled = errors.New("async: plugin not installed on this *gorm.DB (call db.Use(&async.Plugin{}))")
	// ErrUnsupportedDialect is returned by Plugin.Initialize for a database other
	// than PostgreSQL, MySQL/MariaDB or SQLite.
	ErrUnsupportedDialect = errors.New("async: unsupported database dialect")
	// ErrNilTask is returned when Schedule is given a nil task.
	ErrNilTask = errors.New("async: nil task")
	// ErrUnknownTask is returned (and recorded on the job) when a task name is
	// not registered in the running process.
	ErrUnknownTask = errors.New("async: unknown task")
	// ErrBadSignature is returned by Register for a function that is not a task.
	ErrBadSignature = errors.New("async: bad task signature")
	// ErrBadArguments is returned when arguments do not fit the task's
	// parameters, or are not valid JSON.
	ErrBadArguments = errors.New("async: bad task arguments")
	// ErrBadResult is recorded when a task's result cannot be JSON-encoded.
	ErrBadResult = errors.New("async: task result is not JSON-encodable")
	// ErrTaskPanicked is recorded when a task panics.
	ErrTaskPanicked = errors.New("async: task panicked")
	// ErrTimeout is recorded when a task runs longer than its timeout.
	ErrTimeout = errors.New("async: task timed out")
	// ErrPermanent marks a task error as permanent: the job fails at once, with
	// no retry. Wrap it with Permanent.
	ErrPermanent = errors.New("async: permanent failure")
	// ErrAttemptsExhausted is recorded when a job's attempts run out without a
	// recorded error, for example because its worker process died each time,
	// or its runs could not start or record their failure (the database
	// unreachable or locked).
	ErrAttemptsExhausted = errors.New("async: attempts exhausted")
	// ErrJobNotFound is returned when a job id does not exist.
	ErrJobNotFound = errors.New("async: job not found")
	// ErrLeaseLost is returned when a job's claim was taken over by another
	// worker before it started; the job was not run by this worker.
	ErrLeaseLost = errors.New("async: job lease lost")
	// ErrJobClaimed is returned by Job.Execute for a job that a worker (or a
	// FlushQueue) holds a live lease on: it is running, or about to run.
	ErrJobClaimed = errors.New("async: job is claimed by a worker")
	// ErrBadOption is returned for an invalid option value.
	ErrBadOption = errors.New("async: bad option")
	// ErrPoolTooSmall is returned by NewWorker when the connection pool cannot
	// serve the requested concurrency.
	ErrPoolTooSmall = errors.New("async: connection pool too small for worker concurrency")
	// ErrGroupHasExecutedJobs is returned when a job is added to a group some
	// of whose jobs, but not all, are already done (executed, cancelled or
	// failed).
	ErrGroupHasExecutedJobs = errors.New("async: group already has executed, cancelled or failed jobs")
	// ErrGroupNotFound is returned when no group has the given reference.
	ErrGroupNotFound = errors.New("async: group not found")
	// ErrPartitionBusy is returned by FlushQueue when another run already holds
	// the same --which/--outof partition.
	ErrPartitionBusy = errors.New("async: another flush_queue holds this partition")
	// ErrWriterBusy is returned on SQLite by Retry, Deschedule, FlushQueue
	// and Job.Execute when this process's one writer stays busy longer than
	// SQLite's busy_timeout (at least 5s): a job running in this process
	// holds it, perhaps the job whose task made the call through another
	// handle than its own.
	ErrWriterBusy = errors.New("async: the database's writer is busy")
	// ErrJobTransaction is returned when a task tries to commit or roll back
	// its job's transaction, which commits with the job's completion, and to
	// a statement through a task's *gorm.DB after its run has ended.
	ErrJobTransaction = errors.New("async: the job's transaction belongs to its run")
	// ErrUnknownAlgorithm is returned for an unknown estimation algorithm.
	ErrUnknownAlgorithm = errors.New("async: unknown estimation algorithm")
)

// Permanent wraps err so that the job fails at once instead of being retried.
// errors.Is(Permanent(err), ErrPermanent) and errors.Is(Permanent(err), err) both hold.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &permanentError{err: err}
}

type permanentError struct{ err error }

func (e *permanentError) Error() string   { return e.err.Error() }
func (e *permanentError) Unwrap() []error { return []error{ErrPermanent, e.err} }

func errorf(sentinel error, format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{sentinel}, args...)...)
}

// ErrNotPending is returned by Job.Execute for a job that is executed,
// cancelled or failed.
var ErrNotPending = errors.New("async: job is not pending")
