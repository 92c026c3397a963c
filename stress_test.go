package async_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// A randomized concurrency stress test. Per database, producers schedule
// jobs (Schedule and ScheduleMany, in transactions that commit or roll
// back), groups with final jobs, deschedule, retry and execute jobs, and
// ask for Health, while several workers (strict and group commit, in two
// "processes") and FlushQueue calls run them. The tasks write a row of the
// application's and then succeed, fail or panic at random. Once the queue
// has drained (polled), the test checks the invariants the README promises:
//
//   - a job exists iff its scheduling transaction committed, with the
//     application's row of that transaction;
//   - every job ended in exactly one state; an executed job has exactly one
//     task row, from a run that succeeded, whose token is the job's result,
//     and AfterRun reported exactly one executed run of it; no other job
//     has task rows, and no failed run's row survived (nor a row written in
//     a savepoint the task rolled back);
//   - every error row names a failed run of its own job; a failed job has
//     one; a job nothing interfered with (Retry, Deschedule, Execute) has
//     one error row per attempt but its successful one, and ended failed
//     only after its attempts or a permanent error;
//   - a cancelled job was cancelled by a Deschedule that said so, and one
//     that Deschedule cancelled stays cancelled unless retried;
//   - a group's final job ran after every other job of its group ended, and
//     no run of it that committed saw one of them pending;
//   - Health's counts agree with the table.
//
// The test runs a few seconds per database. ASYNC_STRESS_SEED replays a
// seed's sequence of operations (the timing, and so the interleaving, still
// varies).

// StressEffect is a task's write: one row per run, keyed by its job's key.
type StressEffect struct {
	ID  int64  `gorm:"primaryKey"`
	K   string `gorm:"column:k;size:100;index"`
	Run string `gorm:"column:run;size:120;uniqueIndex"`
}

// StressOrder is the application's write in a scheduling transaction.
type StressOrder struct {
	ID int64  `gorm:"primaryKey"`
	K  string `gorm:"column:k;size:100;uniqueIndex"`
}

// stressRuns: run token -> outcome of the task's run ("ok", "error",
// "panic", "permanent").
var (
	stressRuns sync.Map
	stressSeq  atomic.Int64

	stressRandMu sync.Mutex
	stressRand   = rand.New(rand.NewSource(1))
)

func stressRandFloat() float64 {
	stressRandMu.Lock()
	defer stressRandMu.Unlock()
	return stressRand.Float64()
}

var errStress = errors.New("stress failure")

// stressBody is the tasks' common part: it writes the run's row, perhaps
// writes another in a savepoint it rolls back, perhaps sleeps, then ends
// at random. Its result is the run's token.
func stressBody(ctx context.Context, tx *gorm.DB, key string) (string, error) {
	return stressBodyNoting(ctx, tx, key, nil)
}

// stressBodyNoting is stressBody, calling note (if not nil) with the run's
// token first.
func stressBodyNoting(ctx context.Context, tx *gorm.DB, key string, note func(token string)) (string, error) {
	token := fmt.Sprintf("%s#r%d", key, stressSeq.Add(1))
	if note != nil {
		note(token)
	}
	if err := tx.Create(&StressEffect{K: key, Run: token}).Error; err != nil {
		stressRuns.Store(token, "error")
		return "", err
	}
	if stressRandFloat() < 0.1 {
		// A nested transaction (a savepoint) rolled back: its row must not survive.
		_ = tx.Transaction(func(tx *gorm.DB) error {
			if err := tx.Create(&StressEffect{K: key, Run: token + "/nested"}).Error; err != nil {
				return err
			}
			return errors.New("roll back the savepoint")
		})
	}
	switch r := stressRandFloat(); {
	case r < 0.04:
		time.Sleep(time.Duration(10+stressRandFloat()*20) * time.Millisecond)
	case r < 0.2:
		time.Sleep(time.Duration(stressRandFloat() * float64(2*time.Millisecond)))
	}
	switch r := stressRandFloat(); {
	case r < 0.15:
		stressRuns.Store(token, "error")
		return "", fmt.Errorf("%w run=%s", errStress, token)
	case r < 0.23:
		stressRuns.Store(token, "panic")
		panic("stress panic run=" + token)
	case r < 0.26:
		stressRuns.Store(token, "permanent")
		return "", async.Permanent(fmt.Errorf("%w run=%s", errStress, token))
	}
	stressRuns.Store(token, "ok")
	return token, nil
}

func stressTask(ctx context.Context, tx *gorm.DB, key string) (string, error) {
	return stressBody(ctx, tx, key)
}

// stressFinal is a group's final job: it counts, in its own transaction,
// the other jobs of its group still pending. A run that commits must see
// none (check); one whose run is then skipped or rolled back may.
func stressFinal(ctx context.Context, tx *gorm.DB, key, ref string) (string, error) {
	var n int64
	err := tx.Raw("SELECT COUNT(*) FROM async_job o JOIN async_group g ON o.group_id = g.id"+
		" WHERE g.final_id = (SELECT id FROM async_job WHERE args = ?) AND o.id <> g.final_id"+
		" AND o.executed IS NULL AND o.cancelled IS NULL AND o.failed IS NULL", stressFinalArgs(key, ref)).
		Scan(&n).Error
	if err != nil {
		return "", err
	}
	var saw string
	if n > 0 {
		var rows []async.Job
		tx.Raw("SELECT o.* FROM async_job o JOIN async_group g ON o.group_id = g.id WHERE g.final_id = (SELECT id FROM async_job WHERE args = ?)", stressFinalArgs(key, ref)).Scan(&rows)
		for _, o := range rows {
			saw += fmt.Sprintf("\n    job %d %s attempts %d locked_by %q until %v added %s scheduled %v executed %v cancelled %v failed %v group %v",
				o.ID, o.Args, o.Attempts, o.LockedBy, o.LockedUntil, o.Added.Format("15:04:05.000000"), o.Scheduled, o.Executed, o.Cancelled, o.Failed, *o.GroupID)
		}
		saw += fmt.Sprintf("\n    at %s", time.Now().UTC().Format("15:04:05.000000"))
	}
	return stressBodyNoting(ctx, tx, key, func(token string) {
		if n > 0 {
			stressFinalSaw.Store(token, fmt.Sprintf("%d: %s", n, saw))
		}
	})
}

// stressFinalSaw: run token of a final job -> other jobs of its group it
// saw pending.
var stressFinalSaw sync.Map

func stressFinalArgs(key, ref string) string {
	b, _ := json.Marshal([]string{key, ref})
	return string(b)
}

func init() {
	async.MustRegister(stressTask)
	async.MustRegister(stressFinal)
}

// stressKey is what the test knows about a key's job.
type stressKey struct {
	committed   bool   // its scheduling transaction committed
	rolledBack  bool   // its scheduling transaction rolled back
	group       string // its group's reference, if any
	final       bool   // it is its group's final job
	descheduled int64  // jobs Deschedule reported cancelled for it
	retried     bool   // Retry made it pending again at least once
	executes    int    // Execute calls that reported success
	execCalls   int    // Execute calls
	late        bool   // added to its group after the group's first transaction
}

type stressState struct {
	t     *testing.T
	kind  string
	dbs   []*gorm.DB // [0] the test's handle; [1] another process's, if any
	mu    sync.Mutex
	keys  map[string]*stressKey
	order []string // keys in creation order
	refs  []string // committed group references
	seq   atomic.Int64

	ranMu  sync.Mutex
	ran    map[int64][]string // job id -> runs AfterRun reported executed
	before map[int64][]string // job id -> runs BeforeRun saw

	unexpected []string // errors no operation should return
}

func (s *stressState) newKey(what string) string {
	return fmt.Sprintf("%s-%s-%d", s.kind, what, s.seq.Add(1))
}

func (s *stressState) note(key string, f func(k *stressKey)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.keys[key]
	if k == nil {
		k = &stressKey{}
		s.keys[key] = k
		s.order = append(s.order, key)
	}
	f(k)
}

func (k *stressKey) String() string {
	return fmt.Sprintf("[group %q final %v late %v descheduled %d retried %v execute calls %d ok %d]", k.group, k.final, k.late, k.descheduled, k.retried, k.execCalls, k.executes)
}

func (s *stressState) unexpectedErr(op string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.unexpected = append(s.unexpected, fmt.Sprintf("%s: %v", op, err))
}

// afterRun counts the runs reported executed, per job.
func (s *stressState) afterRun(_ context.Context, info async.RunInfo) {
	if info.Outcome == async.OutcomeExecuted {
		s.ranMu.Lock()
		s.ran[info.Job.ID] = append(s.ran[info.Job.ID], fmt.Sprintf("{attempt %d started %s took %s err %v}", info.Job.Attempts, info.Started.Format("15:04:05.000000"), info.Duration, info.Err))
		s.ranMu.Unlock()
	}
}

func stressSeed(t *testing.T) int64 {
	if v := os.Getenv("ASYNC_STRESS_SEED"); v != "" {
		seed, err := strconv.ParseInt(v, 10, 64)
		require.NoError(t, err)
		return seed
	}
	return time.Now().UnixNano()
}

func TestStress(t *testing.T) {
	seed := stressSeed(t)
	t.Logf("seed %d (replay with ASYNC_STRESS_SEED=%d)", seed, seed)
	for i, kind := range dbKinds {
		t.Run(kind, func(t *testing.T) { runStress(t, kind, seed+int64(i)) })
	}
}

func stressRetryPolicy(job *async.Job, failures int) (time.Duration, int) {
	return time.Duration(rand.Int63n(int64(15 * time.Millisecond))), job.Priority
}

func runStress(t *testing.T, kind string, seed int64) {
	stressRandMu.Lock()
	stressRand = rand.New(rand.NewSource(seed))
	stressRandMu.Unlock()

	s := &stressState{t: t, kind: fmt.Sprintf("%s%d", kind, seed%1000000), keys: map[string]*stressKey{}, ran: map[int64][]string{}, before: map[int64][]string{}}
	plugin := func() *async.Plugin {
		return &async.Plugin{MaxAttempts: 3, RetryPolicy: stressRetryPolicy, AfterRun: s.afterRun,
			BeforeRun: func(ctx context.Context, tx *gorm.DB, job *async.Job) context.Context {
				s.ranMu.Lock()
				s.before[job.ID] = append(s.before[job.ID], fmt.Sprintf("{run at %s by %s attempt %d}", time.Now().UTC().Format("15:04:05.000000"), job.LockedBy, job.Attempts))
				s.ranMu.Unlock()
				return ctx
			}}
	}
	d := newTestDB(t, kind, plugin())
	require.NoError(t, d.DB.AutoMigrate(&StressEffect{}, &StressOrder{}))
	s.dbs = []*gorm.DB{d.DB, secondHandle(t, d, d.DSN, plugin())}

	// Workers: strict and group commit, in this process and in another.
	poll := 50 * time.Millisecond
	var stops []func()
	stops = append(stops,
		startWorker(t, s.dbs[0], async.WorkerOptions{Concurrency: 3, Prefetch: 4, PollInterval: poll}),
		startWorker(t, s.dbs[0], async.WorkerOptions{Concurrency: 2, BatchSize: 8, BatchWindow: 10 * time.Millisecond, PollInterval: poll}),
		startWorker(t, s.dbs[1], async.WorkerOptions{Concurrency: 2, Prefetch: -1, PollInterval: poll}),
		startWorker(t, s.dbs[1], async.WorkerOptions{Concurrency: 1, BatchSize: 4, Prefetch: 4, PollInterval: poll}),
	)

	// FlushQueue, on both handles, until the producers are done.
	flushCtx, stopFlush := context.WithCancel(context.Background())
	var flushers sync.WaitGroup
	for i := range s.dbs {
		flushers.Add(1)
		go func() {
			defer flushers.Done()
			r := rand.New(rand.NewSource(seed + 100 + int64(i)))
			for flushCtx.Err() == nil {
				opts := async.FlushOptions{Jobs: 1 + r.Intn(4)}
				if r.Intn(3) == 0 {
					opts.OutOf, opts.Which = 2, r.Intn(2)
				}
				_, err := async.FlushQueue(s.dbs[i], opts)
				if err != nil && !expectedTaskErr(err) && !errors.Is(err, async.ErrPartitionBusy) && !errors.Is(err, async.ErrWriterBusy) {
					s.unexpectedErr("FlushQueue", err)
				}
				time.Sleep(time.Duration(r.Intn(20)) * time.Millisecond) // pacing
			}
		}()
	}

	ops := 60
	if kind == "sqlite" {
		ops = 40
	}
	start := time.Now()
	var producers sync.WaitGroup
	for i := range 3 {
		producers.Add(1)
		go func() {
			defer producers.Done()
			r := rand.New(rand.NewSource(seed + 10 + int64(i)))
			for range ops {
				s.op(r)
				time.Sleep(time.Duration(r.Intn(3)) * time.Millisecond) // pacing
			}
		}()
	}
	producers.Wait()
	stopFlush()
	flushers.Wait()
	produced := time.Since(start)

	// Drain: every job ends executed, cancelled or failed.
	deadline := time.Now().Add(60 * time.Second)
	for {
		var pending int64
		require.NoError(t, d.DB.Table("async_job").Where("executed IS NULL AND cancelled IS NULL AND failed IS NULL").Count(&pending).Error)
		if pending == 0 {
			break
		}
		if time.Now().After(deadline) {
			var left []async.Job
			d.DB.Where("executed IS NULL AND cancelled IS NULL AND failed IS NULL").Find(&left)
			for _, j := range left {
				t.Logf("pending: %d %s attempts=%d locked_by=%q locked_until=%v scheduled=%v group=%v", j.ID, j.String(), j.Attempts, j.LockedBy, j.LockedUntil, j.Scheduled, j.GroupID)
			}
			t.Fatalf("seed %d: %d jobs still pending after 60s", seed, pending)
		}
		time.Sleep(10 * time.Millisecond) // polling the database's state
	}
	for _, stop := range stops {
		stop()
	}
	t.Logf("%s: %d keys, produced in %s, drained in %s", kind, len(s.keys), produced.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	s.check(d.DB, seed)
}

// expectedTaskErr reports whether err is one of the stress tasks' failures.
func expectedTaskErr(err error) bool {
	return errors.Is(err, errStress) || errors.Is(err, async.ErrTaskPanicked)
}

// op runs one random operation.
func (s *stressState) op(r *rand.Rand) {
	db := s.dbs[r.Intn(len(s.dbs))]
	switch n := r.Intn(100); {
	case n < 40:
		s.scheduleTx(r, db)
	case n < 55:
		s.groupTx(r, db)
	case n < 62:
		s.addToGroup(r, db)
	case n < 74:
		s.deschedule(r, db)
	case n < 84:
		s.retry(r, db)
	case n < 92:
		s.execute(r, db)
	default:
		if _, err := async.Health(db); err != nil {
			s.unexpectedErr("Health", err)
		}
	}
}

func (s *stressState) jobOpts(r *rand.Rand, key string) []async.Option {
	opts := []async.Option{async.Args(key), async.Priority(3 + r.Intn(5))}
	if r.Intn(5) == 0 {
		opts = append(opts, async.RunAfter(time.Now().Add(time.Duration(r.Intn(80))*time.Millisecond)))
	}
	return opts
}

// inTx runs work in a transaction that commits unless rollback, and records
// the keys' fate.
func (s *stressState) inTx(db *gorm.DB, op string, rollback bool, keys *[]string, work func(tx *gorm.DB) error) {
	errRollback := errors.New("rollback")
	err := db.Transaction(func(tx *gorm.DB) error {
		if err := work(tx); err != nil {
			return err
		}
		for _, k := range *keys {
			if err := tx.Create(&StressOrder{K: k}).Error; err != nil {
				return err
			}
		}
		if rollback {
			return errRollback
		}
		return nil
	})
	switch {
	case err == nil:
		for _, k := range *keys {
			s.note(k, func(sk *stressKey) { sk.committed = true })
		}
	case errors.Is(err, errRollback), errors.Is(err, async.ErrGroupHasExecutedJobs):
		for _, k := range *keys {
			s.note(k, func(sk *stressKey) { sk.rolledBack = true })
		}
	default:
		// Unknown fate: the check accepts either.
		s.unexpectedErr(op, err)
	}
}

func (s *stressState) scheduleTx(r *rand.Rand, db *gorm.DB) {
	var keys []string
	many := r.Intn(2) == 0
	n := 1 + r.Intn(6)
	s.inTx(db, "schedule", r.Intn(4) == 0, &keys, func(tx *gorm.DB) error {
		var calls []async.Call
		for range n {
			k := s.newKey("j")
			keys = append(keys, k)
			if many {
				calls = append(calls, async.Task(stressTask, s.jobOpts(r, k)...))
			} else if _, err := async.Schedule(tx, stressTask, s.jobOpts(r, k)...); err != nil {
				return err
			}
		}
		if many {
			_, err := async.ScheduleMany(tx, calls...)
			return err
		}
		return nil
	})
}

func (s *stressState) groupTx(r *rand.Rand, db *gorm.DB) {
	ref := s.newKey("g")
	var keys []string
	n := r.Intn(5) // members; a group may have none but its final job
	finalFirst := r.Intn(2) == 0
	rollback := r.Intn(5) == 0
	s.inTx(db, "group", rollback, &keys, func(tx *gorm.DB) error {
		final := func() error {
			k := s.newKey("f")
			keys = append(keys, k)
			s.note(k, func(sk *stressKey) { sk.group, sk.final = ref, true })
			_, err := async.OnCompletion(tx, ref, stressFinal, async.Args(k, ref), async.Priority(3+r.Intn(5)))
			return err
		}
		if finalFirst {
			if err := final(); err != nil {
				return err
			}
		}
		var calls []async.Call
		for range n {
			k := s.newKey("m")
			keys = append(keys, k)
			s.note(k, func(sk *stressKey) { sk.group = ref })
			calls = append(calls, async.Task(stressTask, append(s.jobOpts(r, k), async.InGroup(ref))...))
		}
		if len(calls) > 0 {
			if _, err := async.ScheduleMany(tx, calls...); err != nil {
				return err
			}
		}
		if !finalFirst {
			return final()
		}
		return nil
	})
	if !rollback {
		s.mu.Lock()
		if s.keys[keys[0]].committed {
			s.refs = append(s.refs, ref)
		}
		s.mu.Unlock()
	}
}

// addToGroup schedules a member into a group scheduled earlier, in a
// transaction of its own; it is refused once some job of the group is done.
func (s *stressState) addToGroup(r *rand.Rand, db *gorm.DB) {
	s.mu.Lock()
	if len(s.refs) == 0 {
		s.mu.Unlock()
		return
	}
	ref := s.refs[r.Intn(len(s.refs))]
	s.mu.Unlock()
	var keys []string
	s.inTx(db, "add to group", r.Intn(4) == 0, &keys, func(tx *gorm.DB) error {
		k := s.newKey("m")
		keys = append(keys, k)
		s.note(k, func(sk *stressKey) { sk.group, sk.late = ref, true })
		_, err := async.Schedule(tx, stressTask, append(s.jobOpts(r, k), async.InGroup(ref))...)
		return err
	})
}

// pick returns a random committed key that is not a final job, with
// members of groups only if groups.
func (s *stressState) pick(r *rand.Rand, groups bool) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var cands []string
	for _, k := range s.order {
		sk := s.keys[k]
		if sk.committed && !sk.final && (groups || sk.group == "") {
			cands = append(cands, k)
		}
	}
	if len(cands) == 0 {
		return ""
	}
	return cands[r.Intn(len(cands))]
}

func (s *stressState) deschedule(r *rand.Rand, db *gorm.DB) {
	k := s.pick(r, true)
	if k == "" {
		return
	}
	var n int64
	var err error
	if r.Intn(2) == 0 {
		n, err = async.Deschedule(db, stressTask, async.Args(k))
	} else {
		err = db.Transaction(func(tx *gorm.DB) error {
			var e error
			n, e = async.Deschedule(tx, stressTask, async.Args(k))
			return e
		})
	}
	if err != nil {
		if !errors.Is(err, async.ErrWriterBusy) {
			s.unexpectedErr("Deschedule", err)
		}
		return
	}
	s.note(k, func(sk *stressKey) { sk.descheduled += n })
}

// retry makes a failed or cancelled job outside groups pending again.
func (s *stressState) retry(r *rand.Rand, db *gorm.DB) {
	var jobs []async.Job
	if err := db.Where("group_id IS NULL AND executed IS NULL AND (failed IS NOT NULL OR cancelled IS NOT NULL)").Find(&jobs).Error; err != nil {
		s.unexpectedErr("retry: find", err)
		return
	}
	if len(jobs) == 0 {
		return
	}
	j := jobs[r.Intn(len(jobs))]
	key := stressJobKey(&j)
	// Noted first: the job may run again at once.
	s.note(key, func(sk *stressKey) { sk.retried = true })
	if err := async.Retry(db, j.ID); err != nil && !errors.Is(err, async.ErrBadOption) && !errors.Is(err, async.ErrWriterBusy) {
		s.unexpectedErr("Retry", err)
	}
}

// execute runs a pending job outside groups with Job.Execute.
func (s *stressState) execute(r *rand.Rand, db *gorm.DB) {
	var jobs []async.Job
	if err := db.Where("group_id IS NULL AND executed IS NULL AND cancelled IS NULL AND failed IS NULL").Limit(20).Find(&jobs).Error; err != nil {
		s.unexpectedErr("execute: find", err)
		return
	}
	if len(jobs) == 0 {
		return
	}
	j := jobs[r.Intn(len(jobs))]
	s.note(stressJobKey(&j), func(sk *stressKey) { sk.execCalls++ })
	err := j.Execute(db)
	switch {
	case err == nil:
		s.note(stressJobKey(&j), func(sk *stressKey) { sk.executes++ })
	case expectedTaskErr(err), errors.Is(err, async.ErrNotPending), errors.Is(err, async.ErrWriterBusy),
		errors.Is(err, async.ErrJobClaimed): // a worker, a FlushQueue or another Execute holds it
	case errors.Is(err, async.ErrLeaseLost):
		// Another Execute took the job over, or a Deschedule cancelled it,
		// between this one's claim and its run.
	default:
		s.unexpectedErr(fmt.Sprintf("Execute job %d", j.ID), err)
	}
}

// stressJobKey is the key a stress job was scheduled with: its first argument.
func stressJobKey(j *async.Job) string {
	var args []any
	if json.Unmarshal([]byte(j.Args), &args) != nil || len(args) == 0 {
		return ""
	}
	k, _ := args[0].(string)
	return k
}

var stressTokenRE = regexp.MustCompile(`run=(\S+#r\d+)`)

// check asserts the invariants on the drained queue.
func (s *stressState) check(db *gorm.DB, seed int64) {
	t := s.t
	var fails []string
	fail := func(format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		// Say what the test did to the jobs the message names.
		for _, k := range regexp.MustCompile(`\b`+regexp.QuoteMeta(s.kind)+`-[jmf]-\d+\b`).FindAllString(msg, -1) {
			if sk := s.keys[k]; sk != nil {
				msg += " " + k + sk.String()
			}
		}
		fails = append(fails, msg)
	}
	defer func() {
		if len(fails) > 0 {
			sort.Strings(fails)
			if len(fails) > 40 {
				fails = append(fails[:40], fmt.Sprintf("... and %d more", len(fails)-40))
			}
			t.Errorf("seed %d: %d invariant violations:\n%s", seed, len(fails), strings.Join(fails, "\n"))
		}
	}()
	for _, e := range s.unexpected {
		fail("unexpected error from %s", e)
	}

	var jobs []async.Job
	require.NoError(t, db.Order("id").Find(&jobs).Error)
	var effects []StressEffect
	require.NoError(t, db.Find(&effects).Error)
	var orders []StressOrder
	require.NoError(t, db.Find(&orders).Error)
	var errs []async.JobError
	require.NoError(t, db.Order("id").Find(&errs).Error)
	var groups []async.Group
	require.NoError(t, db.Find(&groups).Error)

	byKey := map[string]*async.Job{}
	byID := map[int64]*async.Job{}
	for i := range jobs {
		j := &jobs[i]
		byID[j.ID] = j
		k := stressJobKey(j)
		if byKey[k] != nil {
			fail("key %s has two jobs: %d and %d", k, byKey[k].ID, j.ID)
		}
		byKey[k] = j
	}
	effectsOf := map[string][]StressEffect{}
	for _, e := range effects {
		if n, ok := stressFinalSaw.Load(e.Run); ok {
			fail("final job run %s committed, having seen %v other jobs of its group pending", e.Run, n)
		}
		effectsOf[e.K] = append(effectsOf[e.K], e)
		out, _ := stressRuns.Load(e.Run)
		if out != "ok" {
			fail("effect %s of key %s committed, but its run ended %v", e.Run, e.K, out)
		}
	}
	hasOrder := map[string]bool{}
	for _, o := range orders {
		hasOrder[o.K] = true
	}
	errsOf := map[int64][]async.JobError{}
	for _, e := range errs {
		errsOf[e.JobID] = append(errsOf[e.JobID], e)
		if byID[e.JobID] == nil {
			fail("error row %d is for job %d, which does not exist", e.ID, e.JobID)
			continue
		}
		m := stressTokenRE.FindStringSubmatch(e.Exception)
		if m == nil {
			fail("job %d's error row %d names no failed run of its task: %s", e.JobID, e.ID, firstLine(e.Exception))
			continue
		}
		key := stressJobKey(byID[e.JobID])
		if !strings.HasPrefix(m[1], key+"#") {
			fail("job %d (key %s) charged with run %s of another job", e.JobID, key, m[1])
		}
		if out, _ := stressRuns.Load(m[1]); out == "ok" || out == nil {
			fail("job %d's error row %d is for run %s, which ended %v", e.JobID, e.ID, m[1], out)
		}
	}
	groupByID := map[int64]*async.Group{}
	for i := range groups {
		groupByID[groups[i].ID] = &groups[i]
	}

	s.ranMu.Lock()
	ran := s.ran
	s.ranMu.Unlock()

	s.mu.Lock()
	defer s.mu.Unlock()
	var counts struct{ all, executed, cancelled, failed int64 }
	for _, k := range s.order {
		sk := s.keys[k]
		j := byKey[k]
		switch {
		case sk.committed && j == nil:
			fail("key %s: its transaction committed but it has no job", k)
			continue
		case sk.rolledBack && j != nil:
			fail("key %s: its transaction rolled back but job %d exists", k, j.ID)
			continue
		case sk.committed && !hasOrder[k], sk.rolledBack && hasOrder[k]:
			fail("key %s: the application's row does not share its transaction's fate", k)
		}
		if j == nil {
			if len(effectsOf[k]) > 0 {
				fail("key %s has no job but %d effects", k, len(effectsOf[k]))
			}
			continue
		}
		states := 0
		for _, ts := range []*time.Time{j.Executed, j.Cancelled, j.Failed} {
			if ts != nil {
				states++
			}
		}
		if states != 1 {
			fail("job %d (%s) is in %d end states (executed %v, cancelled %v, failed %v)", j.ID, k, states, j.Executed, j.Cancelled, j.Failed)
		}
		eff := effectsOf[k]
		switch {
		case j.Executed != nil:
			if len(eff) != 1 {
				fail("job %d (%s) executed with %d effects", j.ID, k, len(eff))
			} else if res := `"` + eff[0].Run + `"`; j.Result != res {
				fail("job %d (%s): result %s, but its committed effect is run %s", j.ID, k, j.Result, eff[0].Run)
			}
			if j.Started == nil || j.LockedBy != "" || j.LockedUntil != nil {
				fail("job %d (%s) executed with started %v, lease %q until %v", j.ID, k, j.Started, j.LockedBy, j.LockedUntil)
			}
			if len(ran[j.ID]) != 1 {
				fail("job %d (%s) executed; AfterRun reported %d executed runs: %v", j.ID, k, len(ran[j.ID]), ran[j.ID])
			}
		default:
			if len(eff) != 0 {
				fail("job %d (%s) not executed but has %d effects", j.ID, k, len(eff))
			}
			if len(ran[j.ID]) != 0 {
				fail("job %d (%s) not executed; AfterRun reported %d executed runs: %v", j.ID, k, len(ran[j.ID]), ran[j.ID])
			}
		}
		if j.Failed != nil && len(errsOf[j.ID]) == 0 {
			fail("job %d (%s) failed with no error recorded", j.ID, k)
		}
		if j.Cancelled != nil && sk.descheduled == 0 {
			fail("job %d (%s) cancelled, but no Deschedule reported cancelling it", j.ID, k)
		}
		if sk.descheduled > 1 && !sk.retried {
			fail("key %s: Deschedule reported %d cancellations of its one job", k, sk.descheduled)
		}
		if sk.descheduled == 1 && !sk.retried && j.Cancelled == nil {
			fail("job %d (%s): Deschedule cancelled it, but it ended executed %v / failed %v", j.ID, k, j.Executed, j.Failed)
		}
		if sk.executes > 0 && j.Executed == nil {
			fail("job %d (%s): Execute reported success, but it is not executed", j.ID, k)
		}
		// A job nobody interfered with: each attempt counted ended in its
		// completion or in an error row.
		if !sk.retried && sk.descheduled == 0 && sk.execCalls == 0 {
			ne := len(errsOf[j.ID])
			switch {
			case j.Executed != nil && ne != j.Attempts-1:
				fail("job %d (%s) executed after %d attempts with %d errors", j.ID, k, j.Attempts, ne)
			case j.Failed != nil && ne != j.Attempts:
				fail("job %d (%s) failed after %d attempts with %d errors", j.ID, k, j.Attempts, ne)
			case j.Failed != nil && j.Attempts < j.MaxAttempts && !strings.Contains(errsOf[j.ID][ne-1].Exception, "permanentError"):
				fail("job %d (%s) failed after %d of %d attempts, its last error not permanent: %s", j.ID, k, j.Attempts, j.MaxAttempts, firstLine(errsOf[j.ID][ne-1].Exception))
			}
		}
		if sk.final {
			s.checkFinal(j, jobs, groupByID, func(format string, args ...any) {
				msg := fmt.Sprintf(format, args...)
				for i := range jobs {
					if o := &jobs[i]; o.GroupID != nil && *o.GroupID == *j.GroupID {
						msg += fmt.Sprintf("\n    job %d runs %v", o.ID, s.before[o.ID])
					}
				}
				fail("%s", msg)
			})
		}
		counts.all++
		switch {
		case j.Executed != nil:
			counts.executed++
		case j.Cancelled != nil:
			counts.cancelled++
		case j.Failed != nil:
			counts.failed++
		}
	}
	if int(counts.all) != len(jobs) {
		fail("%d jobs in the table, %d scheduled by the test", len(jobs), counts.all)
	}

	h, err := async.Health(db)
	require.NoError(t, err)
	q := h.Queue
	if q.AllJobs != counts.all || q.Executed != counts.executed || q.Cancelled != counts.cancelled || q.Failed != counts.failed || q.Remaining != 0 || q.NotExecuted != 0 {
		fail("Health %+v disagrees with the table: all %d, executed %d, cancelled %d, failed %d", q, counts.all, counts.executed, counts.cancelled, counts.failed)
	}
	if h.Errors.Number != int64(len(errs)) {
		fail("Health counts %d errors, the table %d", h.Errors.Number, len(errs))
	}
	if q.OldestDueAgeSeconds != nil {
		fail("Health reports a due job on a drained queue")
	}
	t.Logf("jobs %d: executed %d, cancelled %d, failed %d; errors %d; effects %d", counts.all, counts.executed, counts.cancelled, counts.failed, len(errs), len(effects))
}

// checkFinal checks a group's final job against the other jobs of its group.
func (s *stressState) checkFinal(f *async.Job, jobs []async.Job, groups map[int64]*async.Group, fail func(string, ...any)) {
	if f.GroupID == nil {
		fail("final job %d has no group", f.ID)
		return
	}
	g := groups[*f.GroupID]
	if g == nil || g.FinalID == nil || *g.FinalID != f.ID {
		fail("final job %d is not its group's final job", f.ID)
		return
	}
	if f.Executed == nil {
		return
	}
	for i := range jobs {
		o := &jobs[i]
		if o.ID == f.ID || o.GroupID == nil || *o.GroupID != *f.GroupID {
			continue
		}
		end := o.Executed
		if end == nil {
			end = o.Cancelled
		}
		if end == nil {
			end = o.Failed
		}
		if end == nil || end.After(*f.Started) {
			members := 0
			for i := range jobs {
				if jobs[i].GroupID != nil && *jobs[i].GroupID == *f.GroupID {
					members++
				}
			}
			fail("final job %d (%s, attempts %d) of group %s (%d jobs) started at %s, before job %d (%s: executed %v cancelled %v failed %v attempts %d) ended (%v)",
				f.ID, stressJobKey(f), f.Attempts, g.Reference, members, f.Started.Format(time.RFC3339Nano), o.ID, stressJobKey(o), o.Executed, o.Cancelled, o.Failed, o.Attempts, end)
		}
	}
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
