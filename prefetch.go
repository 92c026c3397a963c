package async

import "time"

// Prefetch (WorkerOptions.Prefetch): the worker's claims, sized by its free
// slots and, while a backlog of short jobs lasts, by the jobs it keeps ready.

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

// batchDone reports a slot's batch: its jobs and how long they took.
type batchDone struct {
	jobs int
	took time.Duration
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
