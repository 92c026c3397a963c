package async

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"gorm.io/gorm"
)

// WorkerOptions configure a Worker. Zero values take the documented defaults.
type WorkerOptions struct {
	// Concurrency is how many jobs run at once. Default: 10, lowered to fit
	// the pool (MaxOpenConns minus the connections the worker keeps for
	// itself: one for claims and bookkeeping, and on Postgres one that
	// listens for notifications). NewWorker sets the pool's idle limit
	// (SetMaxIdleConns) to what the worker needs, since database/sql's
	// default of 2 would reopen a connection for nearly every job; set it
	// again after NewWorker to keep more. On SQLite jobs still run one at a time,
	// because the database has a single writer.
	Concurrency int
	// Queues are the queues served. Default: ["default"].
	Queues []string
	// PollInterval is how often an idle worker looks for due jobs when
	// nothing wakes it. Default: 1s, with ±20% jitter.
	PollInterval time.Duration
	// JobTimeout cancels a task's context after this long; the run is then
	// rolled back and recorded as a timeout failure. Default: none.
	JobTimeout time.Duration
	// ShutdownTimeout is how long running jobs may take to finish after Run's
	// context is cancelled; then they are cancelled, rolled back and left
	// runnable. Default: 30s.
	ShutdownTimeout time.Duration
	// Lease is how long a claim reserves a job before its run starts; after a
	// worker crash its jobs are claimed again once their lease expires. A
	// running job holds its row lock, so it is never started twice however
	// long it runs. Default: DefaultLease (1 minute).
	Lease time.Duration
	// BatchSize is group commit: up to this many claimed jobs run one after
	// another in one transaction and commit together, each job's writes still
	// atomic with its completion; a failing job is recorded alone and the
	// others of its batch run again, each in its own savepoint. It multiplies
	// throughput where commits are the bottleneck. Costs: completion is
	// visible only at the batch's commit; tasks before a failing one run
	// twice; a batch's rows are not locked while it runs, so a task longer
	// than Lease may be started again elsewhere (its effects still commit at
	// most once). See the README. Default: 1 (strict mode: one transaction
	// per job, the job's row locked while it runs).
	BatchSize int
	// BatchWindow bounds a batch's transaction by time: once it has been
	// open this long, no further job joins it; it commits when the job then
	// running ends, and the batch's other jobs go on in a new transaction.
	// If that job has itself run this long, they go back to the queue at
	// once for other runners instead, so a slow job holds the others back at
	// most this long (not on SQLite, where the batch's transaction is the
	// one writer until it commits). The worker sizes its batches (at most BatchSize) to the
	// jobs that start within the window at the pace of its recent batches.
	// Default: 50ms. Used only when BatchSize > 1.
	BatchWindow time.Duration
	// Prefetch is the most claimed jobs the worker keeps ready besides
	// those running, while a backlog of short jobs lasts (its last claim
	// came back full, and jobs ran under 10ms on average), so that a slot
	// that frees starts its next job at once and one claim serves many jobs.
	// It keeps no more than its slots run in about 20ms, at the recent
	// run time per job. Ready jobs run in claim order (a job scheduled
	// meanwhile at a higher priority waits for them, so about 20ms); if no
	// slot frees for 100ms, they go back to the queue for other workers, as
	// they do at once on shutdown, their attempts uncounted. Negative: claim
	// only for free slots. Default: 16 x Concurrency, at least 128, in strict
	// mode; none with group commit, whose claims already take whole batches
	// (ready batches measured slower there on MariaDB).
	Prefetch int
	// ID names this worker in logs and in the locked_by column. Default:
	// host-pid-random.
	ID string
}

// Worker runs jobs from the database until its context is cancelled. Any
// number of workers, in any number of processes on any hosts, may share one
// database: claims are row-locked transactions, so each job runs once.
type Worker struct {
	p          *Plugin
	opts       WorkerOptions
	staleAfter time.Duration // see staleAfter
}

// DefaultConcurrency is a Worker's concurrency when neither the options nor
// the pool size say otherwise.
const DefaultConcurrency = 10

// NewWorker checks the options against db's connection pool and returns a worker.
func NewWorker(db *gorm.DB, o WorkerOptions) (*Worker, error) {
	p, err := pluginOf(db)
	if err != nil {
		return nil, err
	}
	if o.Concurrency < 0 || o.PollInterval < 0 || o.JobTimeout < 0 || o.ShutdownTimeout < 0 || o.Lease < 0 || o.BatchSize < 0 || o.BatchWindow < 0 {
		return nil, errorf(ErrBadOption, "worker options must not be negative: %+v", o)
	}
	reserved := 1
	if p.dialect.canListen() {
		reserved++
	}
	maxOpen := 0
	sqlDB, err := db.DB()
	if err == nil {
		maxOpen = sqlDB.Stats().MaxOpenConnections
	}
	switch {
	case o.Concurrency == 0 && maxOpen > 0:
		o.Concurrency = min(DefaultConcurrency, maxOpen-reserved)
	case o.Concurrency == 0:
		o.Concurrency = DefaultConcurrency
	}
	if o.Concurrency < 1 || maxOpen > 0 && o.Concurrency+reserved > maxOpen {
		return nil, errorf(ErrPoolTooSmall, "concurrency %d needs %d connections but the pool allows %d (raise SetMaxOpenConns or lower Concurrency)",
			o.Concurrency, o.Concurrency+reserved, maxOpen)
	}
	if sqlDB != nil {
		// database/sql keeps 2 idle connections by default: a busy worker
		// would close and reopen a connection for nearly every job.
		sqlDB.SetMaxIdleConns(o.Concurrency + reserved)
	}
	if len(o.Queues) == 0 {
		o.Queues = []string{DefaultQueue}
	}
	if o.PollInterval == 0 {
		o.PollInterval = time.Second
	}
	if o.ShutdownTimeout == 0 {
		o.ShutdownTimeout = 30 * time.Second
	}
	if o.Lease == 0 {
		o.Lease = DefaultLease
	}
	if o.BatchSize == 0 {
		o.BatchSize = 1
	}
	if o.BatchWindow == 0 {
		o.BatchWindow = 50 * time.Millisecond
	}
	switch {
	case o.Prefetch == 0 && o.BatchSize == 1:
		o.Prefetch = max(16*o.Concurrency, 128)
	case o.Prefetch <= 0:
		o.Prefetch = -1 // none
	}
	if o.ID == "" {
		host, _ := os.Hostname()
		o.ID = fmt.Sprintf("%s-%d-%s", host, os.Getpid(), newOwner()[:6])
	}
	if len(o.ID) > 64 {
		return nil, errorf(ErrBadOption, "worker id %q is longer than 64 bytes", o.ID)
	}
	return &Worker{p: p, opts: o, staleAfter: staleAfter}, nil
}

// Options returns the worker's options with defaults filled in.
func (w *Worker) Options() WorkerOptions { return w.opts }

// Run claims and runs jobs until ctx is cancelled, then stops claiming (a
// claim under way finishes), gives back at once the claimed jobs that have
// not started (their attempts uncounted), gives running jobs
// ShutdownTimeout to finish, cancels the rest (their writes are rolled back
// and they stay runnable) and returns nil. Rolling back, giving back and
// recording failures get as long again as ShutdownTimeout (at least 5s)
// before they are abandoned, so Run returns even when the database stops
// answering; jobs whose give-back was abandoned run again when their lease
// expires. Database errors are logged and retried with backoff; they do not
// end Run.
func (w *Worker) Run(ctx context.Context) error {
	p, o := w.p, w.opts
	log := p.Logger.With("worker", o.ID)
	wake, unsubscribe := p.wakers.subscribe()
	defer unsubscribe()

	// Jobs get their own context: it outlives ctx by the shutdown timeout.
	// What is done after a run ends (its rollback, releases, the record of
	// its failure, AfterRun: detach) outlives that by bookkeepingGrace, then
	// hard ends it, so that Run returns even if the database stops
	// answering (what was cut short waits for its lease to expire).
	hard := newHardStop() // armed at shutdown
	defer hard.release()  // after bg.Wait: releases still under way are not cut short
	jobCtx, cancelJobs := context.WithCancel(hard.carriedBy(context.WithoutCancel(ctx)))
	defer cancelJobs()

	var bg sync.WaitGroup // every goroutine Run starts ends before Run returns
	defer bg.Wait()
	listenCtx, stopListen := context.WithCancel(ctx)
	defer stopListen()
	if p.dialect.canListen() {
		bg.Add(1)
		go func() { defer bg.Done(); w.listen(listenCtx) }()
	}

	// Concurrency long-lived slot goroutines run batches from work, in
	// claim order. (Long-lived, so that their stacks, grown once by the
	// drivers' deep calls, are not grown again for every job.)
	prefetch := max(o.Prefetch, 0)
	work := make(chan []*Job, o.Concurrency+prefetch)
	done := make(chan batchDone, o.Concurrency+prefetch)
	var ready atomic.Int64 // jobs in work, not yet taken by a slot
	var slots sync.WaitGroup
	for range o.Concurrency {
		slots.Add(1)
		go func() {
			defer slots.Done()
			// take is a non-blocking receive from work: in strict mode a
			// run's commit takes the slot's next job with it (runChain).
			take := func() []*Job {
				select {
				case b, ok := <-work:
					if ok {
						ready.Add(-int64(len(b)))
						return b
					}
				default:
				}
				return nil
			}
			var chain *runChain
			if o.BatchSize == 1 {
				chain = &runChain{take: take}
			}
			for {
				var batch []*Job
				if chain != nil {
					batch = chain.pending()
				}
				if batch == nil {
					b, ok := <-work
					if !ok {
						return
					}
					ready.Add(-int64(len(b)))
					batch = b
				}
				start := time.Now()
				infos := p.runJobs(jobCtx, batch, runOptions{timeout: o.JobTimeout, window: o.BatchWindow, stop: ctx.Done(), chain: chain})
				done <- doneReport(infos, start)
			}
		}()
	}
	// giveBack releases jobs taken out of work, on a goroutine of its own
	// (on SQLite a release waits for the one writer, which a running job
	// may hold).
	giveBack := func(batches [][]*Job) {
		bg.Add(1)
		go func() {
			defer bg.Done()
			_ = p.serialize(func() error {
				for _, b := range batches {
					p.releaseUnstarted(detach(jobCtx), b)
				}
				return nil
			})
		}()
	}
	// takeReady empties work and returns how many batches and jobs it took.
	takeReady := func() (nb, nj int) {
		var batches [][]*Job
		for {
			select {
			case b := <-work:
				ready.Add(-int64(len(b)))
				batches = append(batches, b)
				nj += len(b)
			default:
				if len(batches) > 0 {
					giveBack(batches)
				}
				return len(batches), nj
			}
		}
	}
	outstanding := 0 // batches sent to work and not done (running, or ready for a slot)
	var perJob ewma  // run time per job, recent runs weighted most
	var pace ewma    // group commit: time from one job's start to the next one's in a batch
	progress := time.Now()
	finish := func(r batchDone) {
		outstanding--
		if r.jobs > 0 {
			perJob.add(r.took / time.Duration(r.jobs))
		}
		if r.pace > 0 {
			pace.add(r.pace)
		}
		progress = time.Now()
	}
	f := &claimFilter{queues: o.Queues, lease: o.Lease, owner: o.ID}
	retry := newBackoff()
	more := true     // the last claim may have left due jobs behind
	backlog := false // the last claim came back full
	timer := time.NewTimer(0)
	defer timer.Stop()
	staleTimer := time.NewTimer(time.Hour)
	defer staleTimer.Stop()
	for ctx.Err() == nil {
		// Claim for the free slots and, while a backlog of short jobs lasts,
		// the ready jobs Prefetch allows; with ready jobs left, wait until
		// they run low, so that each claim takes many.
		size := batchFit(o.BatchSize, o.BatchWindow, pace.avg)
		limit := (o.Concurrency - outstanding) * size
		pf := 0
		if backlog && perJob.below(prefetchRunLimit) {
			pf = readyLimit(prefetch, o.Concurrency, perJob.avg)
		}
		if more && limit+pf > 0 && ready.Load() <= int64(pf/2) {
			f.limit = claimSize(limit+pf, size)
			workerClaimHook(f.limit, size)
			// Once claimed, jobs go back at once on shutdown.
			claimed, err := p.claimUncancelled(ctx, f)
			if err != nil {
				if ctx.Err() != nil {
					break
				}
				d := retry.next()
				log.Error("async: worker cannot claim jobs; retrying", "error", err, "in", d)
				resetTimer(timer, d)
			} else {
				retry.reset()
				more = len(claimed) == f.limit
				backlog = more
				progress = time.Now()
				for len(claimed) > 0 {
					batch := claimed[:min(size, len(claimed))]
					claimed = claimed[len(batch):]
					outstanding++
					ready.Add(int64(len(batch)))
					work <- batch
				}
				if !more {
					resetTimer(timer, jitter(o.PollInterval))
				}
			}
		}
		// Ready jobs wait for a slot; if no slot frees for a while (a long
		// job in every slot), they go back for other workers to take.
		var stale <-chan time.Time
		if ready.Load() > 0 {
			resetTimer(staleTimer, time.Until(progress.Add(w.staleAfter)))
			stale = staleTimer.C
		}
		select {
		case <-ctx.Done():
		case r := <-done:
			finish(r)
		case <-wake:
			more = true
		case <-timer.C:
			more = true
		case <-stale:
			if time.Since(progress) >= w.staleAfter {
				nb, nj := takeReady()
				outstanding -= nb
				backlog = false
				log.Debug("async: worker gives back jobs claimed ahead: no slot freed", "jobs", nj, "after", w.staleAfter)
			}
		}
		// Take every slot freed meanwhile, so that one claim fills them all.
		for drained := false; !drained; {
			select {
			case r := <-done:
				finish(r)
			default:
				drained = true
			}
		}
	}

	// Jobs still waiting for a slot go back at once, their attempts
	// uncounted; a slot that takes one first sees the shutdown and gives it
	// back too.
	nb, _ := takeReady()
	outstanding -= nb
	close(work)
	// Graceful shutdown: no new claims; running jobs get the shutdown timeout.
	stopListen()
	finished := make(chan struct{})
	go func() { slots.Wait(); close(finished) }()
	if outstanding > 0 {
		log.Info("async: worker stopping; waiting for running jobs", "running", outstanding, "timeout", o.ShutdownTimeout)
	}
	grace := time.NewTimer(o.ShutdownTimeout)
	defer grace.Stop()
	hard.arm(o.ShutdownTimeout + bookkeepingGrace(o.ShutdownTimeout))
	select {
	case <-finished:
	case <-grace.C:
		log.Warn("async: shutdown timeout; cancelling running jobs (they stay runnable)")
		cancelJobs()
		<-finished
	}
	return nil
}

// bookkeepingGrace is how long Run's shutdown lets the runs' rollbacks,
// give-backs and failure records go on after the shutdown timeout.
var bookkeepingGrace = func(shutdown time.Duration) time.Duration {
	return max(shutdown, 5*time.Second)
}
