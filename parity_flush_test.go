package async_test

import (
	"context"
	"fmt"
	"io"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Tasks registered under names with LIKE and GLOB wildcards and the LIKE
// escape character.
// Each needs a function of its own: a function registered twice takes the
// later name.
func init() {
	for name, fn := range map[string]func(context.Context, *gorm.DB, string, string) error{
		"a_b.x": func(ctx context.Context, tx *gorm.DB, log, l string) error { return parityRecord(ctx, tx, log, l) },
		"axb.x": func(ctx context.Context, tx *gorm.DB, log, l string) error { return parityRecord(ctx, tx, log, l) },
		"a%b.x": func(ctx context.Context, tx *gorm.DB, log, l string) error { return parityRecord(ctx, tx, log, l) },
		"a!b.x": func(ctx context.Context, tx *gorm.DB, log, l string) error { return parityRecord(ctx, tx, log, l) },
		"a*b.x": func(ctx context.Context, tx *gorm.DB, log, l string) error { return parityRecord(ctx, tx, log, l) },
		"a[b.x": func(ctx context.Context, tx *gorm.DB, log, l string) error { return parityRecord(ctx, tx, log, l) },
	} {
		if err := async.RegisterAs(name, fn); err != nil {
			panic(err)
		}
	}
}

func sorted(s []string) []string {
	s = append([]string(nil), s...)
	sort.Strings(s)
	return s
}

// Point 5: --which/--outof partition by job id; which is taken modulo outof.
func TestFlushQueuePartitionsByID(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		var odd, even []string
		for i := 0; i < 6; i++ {
			l := fmt.Sprint("j", i)
			j := mustSchedule(t, d.DB, parityRecord, async.Args(log, l))
			if j.ID%2 == 1 {
				odd = append(odd, l)
			} else {
				even = append(even, l)
			}
		}
		require.NotEmpty(t, odd)
		require.NotEmpty(t, even)
		assert.Equal(t, len(odd), flush(t, d, async.FlushOptions{Which: 1, OutOf: 2}))
		assert.Equal(t, odd, logged(log))
		assert.Equal(t, len(even), flush(t, d, async.FlushOptions{Which: 2, OutOf: 2}), "which=2 of 2 is which=0")
		assert.Equal(t, sorted(append(odd, even...)), sorted(logged(log)))
		assert.Zero(t, count(t, d.DB, "async_job", "executed IS NULL"))
		_, err := async.FlushQueue(d.DB, async.FlushOptions{OutOf: -1})
		assert.ErrorIs(t, err, async.ErrBadOption)
	})
}

// Point 5: --filter is a literal, case-sensitive name prefix: % and _ (and
// GLOB's * and [) are not wildcards, nor is the escape character.
func TestFlushQueueFilterIsLiteralPrefix(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		for _, name := range []string{"a_b.x", "axb.x", "a%b.x", "a!b.x", "a*b.x", "a[b.x"} {
			mustSchedule(t, d.DB, name, async.Args(log, name))
		}
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{Filter: "a_b"}))
		assert.Equal(t, []string{"a_b.x"}, logged(log))
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{Filter: "a%"}))
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{Filter: "a!b"}))
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{Filter: "a*"}))
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{Filter: "a[b"}))
		assert.Equal(t, []string{"a_b.x", "a%b.x", "a!b.x", "a*b.x", "a[b.x"}, logged(log))
		assert.Zero(t, flush(t, d, async.FlushOptions{Filter: "a_"}))
		assert.Zero(t, flush(t, d, async.FlushOptions{Filter: "A"}), "the prefix is case-sensitive, like Go names")
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{Filter: "a"}))
		assert.Equal(t, "axb.x", logged(log)[5])
	})
}

// Point 5: --jobs limits a run; zero means 300.
func TestFlushQueueJobsLimit(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		for i := 0; i < 5; i++ {
			mustSchedule(t, d.DB, parityRecord, async.Args(log, fmt.Sprint(i)))
		}
		assert.Equal(t, 2, flush(t, d, async.FlushOptions{Jobs: 2}))
		assert.Equal(t, []string{"0", "1"}, logged(log))
		assert.EqualValues(t, 3, count(t, d.DB, "async_job", "executed IS NULL"))
		assert.Equal(t, 3, flush(t, d, async.FlushOptions{Jobs: 0}))
		assert.Len(t, logged(log), 5)
	})
}

// Point 5: without a limit a run takes at most 300 jobs. (The limit is the same on every database: SQLite's
// runs are the cheapest.)
func TestFlushQueueDefaultLimitIs300(t *testing.T) {
	d := newTestDB(t, "sqlite", nil)
	log := freshLog(t)
	calls := make([]async.Call, 301)
	for i := range calls {
		calls[i] = async.Task(parityRecord, async.Args(log, fmt.Sprint(i)))
	}
	_, err := async.ScheduleMany(d.DB, calls...)
	require.NoError(t, err)
	assert.Equal(t, 300, flush(t, d, async.FlushOptions{}))
	assert.EqualValues(t, 1, count(t, d.DB, "async_job", "executed IS NULL"))
}

// blockingWriter blocks its first Write until the gate is released: a
// FlushQueue given it as Out holds its partition between a claim and the run.
type blockingWriter struct {
	g    *gate
	once bool
	w    io.Writer
}

func (b *blockingWriter) Write(p []byte) (int, error) {
	if !b.once {
		b.once = true
		close(b.g.started)
		<-b.g.release
	}
	if b.w != nil {
		return b.w.Write(p)
	}
	return len(p), nil
}

// Point 5: a second FlushQueue on a partition held by a running one gets
// ErrPartitionBusy at once; another partition runs meanwhile. On Postgres
// and MySQL the partition is held by a running task blocked on a channel.
// On SQLite a running task holds the single database writer, so everything
// else waits for it; there the first run is held instead between its claim
// and its task, by its Out writer.
func TestFlushQueuePartitionBusy(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		key := freshLog(t)
		g := newGate(key)
		opts := async.FlushOptions{OutOf: 2, Jobs: 1}
		var held *async.Job
		if d.Kind == "sqlite" {
			held = mustSchedule(t, d.DB, parityRecord, async.Args(key, "held"))
			opts.Out = &blockingWriter{g: g}
		} else {
			held = mustSchedule(t, d.DB, parityBlock, async.Args(key))
		}
		part := int(held.ID % 2)
		var other *async.Job
		for other == nil || other.ID%2 == held.ID%2 {
			other = mustSchedule(t, d.DB, parityRecord, async.Args(key, fmt.Sprint("other-", part)))
		}
		opts.Which = part
		type result struct {
			n   int
			err error
		}
		first := make(chan result, 1)
		go func() {
			n, err := async.FlushQueue(d.DB, opts)
			first <- result{n, err}
		}()
		waitStarted(t, g)

		start := time.Now()
		n, err := async.FlushQueue(d.DB, async.FlushOptions{Which: part + 2, OutOf: 2})
		require.ErrorIs(t, err, async.ErrPartitionBusy)
		assert.Regexp(t, `^async: `, err.Error())
		assert.Zero(t, n)
		assert.Less(t, time.Since(start), 10*time.Second, "a busy partition is reported at once")

		n, err = async.FlushQueue(d.DB, async.FlushOptions{Which: 1 - part, OutOf: 2})
		require.NoError(t, err, "another partition runs")
		assert.GreaterOrEqual(t, n, 1)
		assert.NotNil(t, jobState(t, d, other.ID).Executed)
		assert.Nil(t, jobState(t, d, held.ID).Executed)

		close(g.release)
		r := <-first
		require.NoError(t, r.err)
		assert.Equal(t, 1, r.n)
		assert.NotNil(t, jobState(t, d, held.ID).Executed)
		// The partition is free again.
		_, err = async.FlushQueue(d.DB, async.FlushOptions{Which: part, OutOf: 2})
		assert.NoError(t, err)
	})
}

// cancelOnWrite cancels a context at its first write: FlushOptions.Out is
// written between a job's claim and its run.
type cancelOnWrite struct{ cancel context.CancelFunc }

func (c cancelOnWrite) Write(b []byte) (int, error) {
	c.cancel()
	return len(b), nil
}

// A FlushQueue whose context ends after a claim gives the claimed job back
// at once, unrun and its attempt uncounted, instead of leaving it leased to
// no one until the lease expires.
func TestFlushQueueCancelledAfterClaimGivesJobBack(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		first := mustSchedule(t, d.DB, parityRecord, async.Args(log, "first"))
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "second"))

		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		n, err := async.FlushQueue(d.DB.WithContext(ctx), async.FlushOptions{Out: cancelOnWrite{cancel}})
		require.ErrorIs(t, err, context.Canceled)
		assert.Zero(t, n)
		assert.Empty(t, logged(log), "no task ran")

		j := jobState(t, d, first.ID)
		assert.Nil(t, j.Executed)
		assert.Nil(t, j.Started)
		assert.Nil(t, j.LockedUntil, "the lease is cleared, not left to expire")
		assert.Empty(t, j.LockedBy)
		assert.Zero(t, j.Attempts, "the attempt is uncounted")

		// Both run at once in the next flush: nothing waits for a lease.
		assert.Equal(t, 2, flush(t, d, async.FlushOptions{}))
		assert.Equal(t, []string{"first", "second"}, logged(log))
	})
}

// clockAdvancer advances a test clock at its first write: FlushOptions.Out
// is written between the first job's claim and its run.
type clockAdvancer struct {
	d    *testDB
	by   time.Duration
	done bool
}

func (c *clockAdvancer) Write(b []byte) (int, error) {
	if !c.done {
		c.done = true
		c.d.Clock.Advance(c.by)
	}
	return len(b), nil
}

// FlushQueue runs the jobs due at its start: a job that falls due while it
// runs is left for the next run.
func TestFlushQueueRunsOnlyJobsDueAtItsStart(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		now := freezeClock(d)
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "due"))
		later := mustSchedule(t, d.DB, parityRecord, async.Args(log, "later"), async.RunAfter(now.Add(30*time.Minute)))
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{Out: &clockAdvancer{d: d, by: time.Hour}}))
		assert.Equal(t, []string{"due"}, logged(log))
		assert.True(t, jobState(t, d, later.ID).Pending(), "due only after the run started")
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{}), "the next run takes it")
		assert.Equal(t, []string{"due", "later"}, logged(log))
	})
}

// A job whose attempts ran out without a result (its worker died) ends
// failed when a claim takes it, and the claim takes the next job instead:
// a FlushQueue behind such a job still runs the jobs due.
func TestFlushQueueRunsJobsBehindAnExhaustedOne(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		lost := mustSchedule(t, d.DB, parityRecord, async.Args(log, "lost"), async.MaxAttempts(1), async.Priority(9))
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "next"))
		// Its one run was lost: the attempt counted, the lease run out.
		require.NoError(t, d.DB.Model(&async.Job{}).Where("id = ?", lost.ID).
			Updates(map[string]any{"attempts": 1, "locked_by": "dead-worker", "locked_until": d.Clock.Now().Add(-time.Minute)}).Error)
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{}))
		assert.Equal(t, []string{"next"}, logged(log))
		j := jobState(t, d, lost.ID)
		require.NotNil(t, j.Failed, "the exhausted job ends failed")
		assert.Equal(t, 1, j.Attempts, "its lost run counted, the claim that ended it did not")
		var e async.JobError
		require.NoError(t, d.DB.Where("job_id = ?", lost.ID).Take(&e).Error)
		assert.Contains(t, e.Exception, async.ErrAttemptsExhausted.Error())
	})
}

// heldFlush starts a FlushQueue with opts that holds its partition lock,
// between its first claim and that job's run, until g is released; it
// returns the run's outcome.
func heldFlush(t *testing.T, d *testDB, g *gate, opts async.FlushOptions) <-chan error {
	t.Helper()
	opts.Out = &blockingWriter{g: g}
	done := make(chan error, 1)
	go func() { _, err := async.FlushQueue(d.DB, opts); done <- err }()
	waitStarted(t, g)
	return done
}

// Point 5: a run without partitions holds the whole queue's one lock,
// whatever its Which and whether OutOf is 0 (FlushQueue's default) or 1
// (flush_queue's): no two unpartitioned runs go at once.
func TestFlushQueueUnpartitionedRunsShareOneLock(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		key := freshLog(t)
		g := newGate(key)
		mustSchedule(t, d.DB, parityRecord, async.Args(key, "held"))
		first := heldFlush(t, d, g, async.FlushOptions{})
		for _, o := range []async.FlushOptions{{OutOf: 1}, {Which: 3, OutOf: 1}, {Which: 1}} {
			_, err := async.FlushQueue(d.DB, o)
			assert.ErrorIs(t, err, async.ErrPartitionBusy, "%+v", o)
		}
		close(g.release)
		require.NoError(t, recv(t, first, time.Minute, "the first run"))
		assert.Equal(t, []string{"held"}, logged(key))
	})
}

// Point 5: the lock of a run that stopped renewing it (a crashed host)
// expires, and another run takes the partition over; the first run, if it
// ends after all, does not release the lock it no longer holds.
func TestFlushQueueExpiredLockIsTakenOverAndKept(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		key := freshLog(t)
		freezeClock(d)
		g1, g2 := newGate(key+"/1"), newGate(key+"/2")
		mustSchedule(t, d.DB, parityRecord, async.Args(key, "a"))
		mustSchedule(t, d.DB, parityRecord, async.Args(key, "b"))
		first := heldFlush(t, d, g1, async.FlushOptions{Jobs: 1})
		// The test clock passes the lock's 30s (not the first job's lease of
		// a minute); the first run renews its lock every 10s of real time,
		// which this test does not last.
		d.Clock.Advance(45 * time.Second)
		second := heldFlush(t, d, g2, async.FlushOptions{Jobs: 1})
		close(g1.release)
		require.NoError(t, recv(t, first, time.Minute, "the first run"))
		_, err := async.FlushQueue(d.DB, async.FlushOptions{})
		assert.ErrorIs(t, err, async.ErrPartitionBusy, "the second run still holds the partition")
		close(g2.release)
		require.NoError(t, recv(t, second, time.Minute, "the second run"))
		assert.Equal(t, []string{"a", "b"}, logged(key))
	})
}
