package async

import (
	"context"
	"sync"
	"time"
)

// The group-commit window (WorkerOptions.BatchWindow) bounds a batch's
// transaction by time. Once the transaction has been open that long, no
// further job joins it: it commits when the job then running ends, and the
// batch's other jobs go on in a new transaction of the same runner. If that
// job has itself been running that long (a slow job), they go back to the
// queue at once instead, for other runners to take: a slow job holds the
// jobs behind it back at most the window. Jobs that merely did not fit stay
// with their runner rather than go round the queue: a release and a claim
// again for each, and (on MySQL) the claim hints forgotten. On SQLite the
// window only closes the transaction: its one writer is the batch's
// transaction until it commits, so no other runner could start the jobs
// sooner, and the release itself would wait for the commit.

// window is one transaction's window over jobs[first:].
type window struct {
	d    time.Duration
	jobs []*Job
	p    *Plugin
	ctx  context.Context // the release's

	mu       sync.Mutex
	next     int       // the first job not yet started
	since    time.Time // when the job now running started
	closed   bool      // no further job joins the transaction
	released bool      // jobs[next:] went back to the queue
	ended    bool      // the transaction takes no more jobs: nothing to release
	timer    *time.Timer
	busy     sync.WaitGroup // a release under way
}

// batchWindow starts the window of a transaction whose first job, jobs[first],
// starts now. With d <= 0, or one job, there is none.
func (p *Plugin) batchWindow(ctx context.Context, jobs []*Job, first int, d time.Duration) *window {
	w := &window{d: d, jobs: jobs, p: p, ctx: ctx, next: first + 1, since: time.Now()}
	if d <= 0 || len(jobs)-first < 2 {
		return w
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.timer = time.AfterFunc(d, w.fire)
	return w
}

// fire closes the window; once the job running then has run d, it gives
// the unstarted jobs back.
func (w *window) fire() {
	w.mu.Lock()
	if w.ended {
		w.mu.Unlock()
		return
	}
	w.closed = true
	if w.p.dialect.singleWriter {
		w.mu.Unlock()
		return
	}
	if wait := w.d - time.Since(w.since); wait > 0 {
		w.timer.Reset(wait) // the running job is not slow yet
		w.mu.Unlock()
		return
	}
	w.released = true
	rest := w.jobs[w.next:]
	w.busy.Add(1)
	w.mu.Unlock()
	defer w.busy.Done()
	w.p.releaseUnstarted(w.ctx, rest)
}

// take reports whether job k may start in this transaction. Once it says
// no, the transaction is ending: the jobs from k on are not released.
func (w *window) take(k int) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		w.ended = true
		return false
	}
	w.next, w.since = k+1, time.Now()
	return true
}

// stop ends the window, waiting for a release under way, and reports
// whether the window released the jobs not started.
func (w *window) stop() bool {
	w.mu.Lock()
	w.ended = true
	w.mu.Unlock()
	if w.timer != nil {
		w.timer.Stop()
	}
	w.busy.Wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.released
}
