package async

import "time"

// The worker's claims, sized by its free slots times the jobs per batch
// (BatchSize, or with group commit what fits BatchWindow: batchFit) and,
// while a backlog of short jobs lasts, by the jobs it keeps ready
// (WorkerOptions.Prefetch).

// Prefetch applies while jobs run shorter than prefetchRunLimit on average,
// and keeps ready no more jobs than the slots run in about prefetchSpan, so
// that the last ready job (and a job scheduled meanwhile at a higher
// priority) waits about that long; ready jobs that wait staleAfter without
// a slot freeing go back to the queue.
const (
	prefetchRunLimit = 10 * time.Millisecond
	prefetchSpan     = 20 * time.Millisecond
	staleAfter       = 100 * time.Millisecond
)

// readyLimit is how many jobs to keep ready: at most prefetch, and about as
// many as concurrency slots run in prefetchSpan at perJob each, at least one.
func readyLimit(prefetch, concurrency int, perJob time.Duration) int {
	if perJob <= 0 {
		return prefetch
	}
	return min(prefetch, max(1, int(time.Duration(concurrency)*prefetchSpan/perJob)))
}

// batchFit is how many jobs a group-commit batch takes: batch (BatchSize),
// or fewer where, one starting every pace, they would not all start within
// window (BatchWindow): the first at once, then one per pace. The window
// gives a batch's unstarted jobs back to the queue, to be claimed again:
// with batches larger than a window holds, every batch paid for claiming,
// leasing and releasing the jobs it did not reach (measured: nearly half
// of the jobs a busy Postgres worker claimed). The size is rounded down to
// one of a few (fitSizes), so that a worker's claims come in a few sizes
// (claimSize).
func batchFit(batch int, window, pace time.Duration) int {
	if batch <= 1 || window <= 0 || pace <= 0 {
		return batch
	}
	fit := window/pace + 1
	if fit >= time.Duration(batch) {
		return batch
	}
	n := 1
	for _, s := range fitSizes {
		if time.Duration(s) <= fit {
			n = s
		}
	}
	return n
}

// fitSizes are the sizes batchFit rounds down to: powers of two and one
// and a half times them, so that it takes at least two thirds of what fits.
var fitSizes = []int{1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024}

// batchDone reports a slot's batch: how many of its jobs ran (the others
// were given back unstarted), how long the batch took, and its pace: the
// mean time from one job's start to the next one's, or with one job run,
// the batch's time (so that a worker whose batches shrank to one job sees
// when two would fit again).
type batchDone struct {
	jobs int
	took time.Duration
	pace time.Duration
}

// doneReport reports a batch that began at start from its runs' infos.
func doneReport(infos []RunInfo, start time.Time) batchDone {
	r := batchDone{took: time.Since(start)}
	var first, last time.Time
	for _, info := range infos {
		if info.Outcome == "" {
			continue // given back unstarted
		}
		if r.jobs == 0 {
			first = info.Started
		}
		last = info.Started
		r.jobs++
	}
	switch {
	case r.jobs > 1:
		r.pace = last.Sub(first) / time.Duration(r.jobs-1)
	case r.jobs == 1:
		r.pace = r.took
	}
	return r
}

// ewma is an exponentially weighted moving average of durations; it knows
// nothing until its first sample.
type ewma struct {
	avg time.Duration
	n   int
}

func (e *ewma) add(d time.Duration) {
	if e.n == 0 {
		e.avg = d
	} else {
		e.avg += (d - e.avg) / 8
	}
	e.n++
}

// below reports whether samples were taken and their average is under d.
func (e *ewma) below(d time.Duration) bool { return e.n > 0 && e.avg < d }

// claimSize is how many jobs to claim when up to limit are wanted: with
// group commit, whole batches where limit allows, so that a worker's claims
// come in a few sizes (on Postgres each size is a prepared statement of its
// own).
func claimSize(limit, batch int) int {
	if limit < batch {
		return limit
	}
	return limit - limit%batch
}

// workerClaimHook sees each claim a worker makes: the most jobs it takes,
// and the jobs per batch (tests).
var workerClaimHook = func(limit, batch int) {}
