package async

import (
	"fmt"
	"sync"
	"time"
)

// Claim hints: where a claim's read of one half of a priority may start.
//
// On InnoDB a finished job leaves a delete-marked entry at the head of
// async_job_pending until purge removes it, and purge lags: by about a
// second's worth of completions under load, and without bound while any
// transaction holds an old read view (a long report, a backup taken with
// --single-transaction). A locking read that starts at the head of a
// priority's range locks, checks and unlocks every one of those entries
// before it reaches a live job, so a claim's cost grew with the purge lag
// rather than with the jobs it takes.
//
// So the process remembers, for each filter, priority and half, the last
// job its last claim there took (its id, or for the scheduled half its
// scheduled time), and the next read starts after it; and, for each filter,
// the highest priority its last claim found pending, so that the next probe
// for the top priority looks only above it. Whatever lies below the hint is
// read only when the hinted read comes up short (so a claim that finds
// nothing has still read the whole range: FlushQueue still runs every due
// job), and in full at least once per hintSpan. A job below the hint that
// becomes claimable while the queue above it stays full (a late commit of an
// earlier-numbered job, a job given back by a worker of another process, a
// lease that expired) therefore waits up to hintSpan longer behind later
// jobs of its priority: run order across workers was never strict, and a
// second bounds the delay. A process that gives jobs back itself (a stopping
// worker, a cancelled FlushQueue, jobs claimed ahead that found no slot)
// forgets its hints, so that its next claim takes them first. Postgres marks
// an index entry dead once no snapshot needs it and claims then skip it
// cheaply, and SQLite removes entries at once: they read from the head of
// the range every time.

// hintSpan is how long a hint may keep a claim from reading below it.
const hintSpan = time.Second

// maxHints bounds the hints a process keeps (filters x priorities x halves).
const maxHints = 1024

// hintKey names the range a hint is for.
type hintKey struct {
	filter string // claimFilter.hintName
	prio   int
	set    dueSet
}

// claimHint is the last job the last read of a range took.
type claimHint struct {
	id        int64     // dueUnscheduled
	scheduled time.Time // dueScheduled
	full      time.Time // when the range was last read in full
}

// claimHints are this process's hints.
type claimHints struct {
	mu   sync.Mutex
	span time.Duration // zero: hintSpan (tests change it)
	m    map[hintKey]claimHint
	tops map[string]int // by filter: the highest priority found pending
}

// top returns the highest priority the last claim of filter found pending.
func (h *claimHints) top(filter string) (int, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.span < 0 {
		return 0, false
	}
	t, ok := h.tops[filter]
	return t, ok
}

// setTop records the highest priority a claim of filter found pending.
func (h *claimHints) setTop(filter string, prio int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.tops == nil || len(h.tops) >= maxHints {
		h.tops = map[string]int{}
	}
	h.tops[filter] = prio
}

// forget drops every hint, so that the next claim of each filter reads its
// ranges from the head. A process that gives jobs back calls it: the jobs
// may lie below its hints, and it should run them first, in run order.
func (h *claimHints) forget() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.m, h.tops = nil, nil
}

// dropTop forgets filter's top priority.
func (h *claimHints) dropTop(filter string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.tops, filter)
}

// get returns the hint for k, if there is one young enough.
func (h *claimHints) get(k hintKey) (claimHint, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	span := h.span
	if span == 0 {
		span = hintSpan
	}
	c, ok := h.m[k]
	if !ok || time.Since(c.full) >= span {
		return claimHint{}, false
	}
	return c, true
}

// put records the last job a read of k took; full says whether the read
// covered the whole range (otherwise the previous full time stays).
func (h *claimHints) put(k hintKey, last *Job, full bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	old, had := h.m[k]
	c := claimHint{id: last.ID, full: old.full}
	if last.Scheduled != nil {
		c.scheduled = *last.Scheduled
	}
	if full || !had {
		c.full = time.Now()
	}
	if h.m == nil || len(h.m) >= maxHints && !had {
		h.m = map[hintKey]claimHint{}
	}
	h.m[k] = c
}

// after records, for a read of k that ended with err, the last of the jobs
// it took (full: the read covered the whole range), and returns err. A
// failed read records nothing: its claim rolls back.
func (h *claimHints) after(k hintKey, jobs []*Job, full bool, err error) error {
	if err == nil && len(jobs) > 0 {
		h.put(k, jobs[len(jobs)-1], full)
	}
	return err
}

// hintName identifies the jobs a filter selects, so that a hint found by
// one filter is not used by another (a queue's jobs below another queue's
// hint would otherwise wait for the full read).
func (f *claimFilter) hintName() string {
	return fmt.Sprintf("%q %q %d/%d", f.queues, f.prefix, f.which, f.outOf)
}

// hintCond is the condition of a read above (or, with below, under) hint c
// in one half of a priority (alias j), and its argument.
func hintCond(set dueSet, c claimHint, below bool) (string, any) {
	if set == dueScheduled {
		if below {
			return " AND j.scheduled < ?", c.scheduled
		}
		return " AND j.scheduled >= ?", c.scheduled
	}
	if below {
		return " AND j.id <= ?", c.id
	}
	return " AND j.id > ?", c.id
}
