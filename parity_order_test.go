package async_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/gormasync/async"
)

// Run order of FlushQueue, as in the reference: priority beats scheduling;
// at equal priority due scheduled jobs run before unscheduled ones, by
// (scheduled, id), and unscheduled ones by id; future jobs do not run.
func TestFlushQueueRunOrder(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		now := freezeClock(d)
		sched := func(label string, prio int, at *time.Time) *async.Job {
			opts := []async.Option{async.Args(log, label), async.Priority(prio)}
			if at != nil {
				opts = append(opts, async.RunAfter(*at))
			}
			return mustSchedule(t, d.DB, parityRecord, opts...)
		}
		at := func(d time.Duration) *time.Time { x := now.Add(d); return &x }
		sched("u5a", 5, nil)
		sched("s5-1m", 5, at(-time.Minute))
		sched("s5-2m", 5, at(-2*time.Minute))
		sched("s5-1m-later-id", 5, at(-time.Minute))
		sched("u9", 9, nil)
		sched("s1-1h", 1, at(-time.Hour))
		future := sched("future9", 9, at(time.Minute))
		sched("u5b", 5, nil)
		sched("s5-now", 5, at(0))

		assert.Equal(t, 8, flush(t, d, async.FlushOptions{}))
		assert.Equal(t, []string{"u9", "s5-2m", "s5-1m", "s5-1m-later-id", "s5-now", "u5a", "u5b", "s1-1h"}, logged(log))
		assert.Nil(t, jobState(t, d, future.ID).Executed, "a job scheduled in the future does not run")

		d.Clock.Advance(time.Minute)
		assert.Equal(t, 1, flush(t, d, async.FlushOptions{}))
		assert.Equal(t, "future9", logged(log)[8])
	})
}
