package async_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/gormasync/async"
)

var (
	recName  = "github.com/gormasync/async_test.parityRecord"
	failName = "github.com/gormasync/async_test.parityFail"
	tickName = "github.com/gormasync/async_test.parityTick"
)

func health(t testing.TB, d *testDB, opts ...async.HealthOption) *async.HealthReport {
	t.Helper()
	r, err := async.Health(d.DB, opts...)
	require.NoError(t, err)
	return r
}

// set writes columns of a job directly, to craft states runs cannot reach
// with a frozen clock.
func set(t testing.TB, d *testDB, id int64, cols map[string]any) {
	t.Helper()
	require.NoError(t, d.DB.Model(&async.Job{}).Where("id = ?", id).Updates(cols).Error)
}

// Point 6: every key of the reference's health(), with its meaning; the
// per-name details, links, failed jobs and error count.
func TestHealthCountsDetailsAndLinks(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		freezeClock(d)
		empty := health(t, d)
		assert.Zero(t, empty.Queue.AllJobs)
		assert.Nil(t, empty.Queue.OldestExecuted)
		assert.Nil(t, empty.Queue.MostRecentCancelled)
		assert.Nil(t, empty.Queue.OldestDueAgeSeconds)
		assert.Equal(t, async.AlgorithmRough, empty.Queue.EstimationAlgorithm, "Health's default is rough")
		raw, err := json.Marshal(empty)
		require.NoError(t, err)
		var m map[string]map[string]any
		require.NoError(t, json.Unmarshal(raw, &m))
		for _, k := range []string{"all-jobs", "executed", "executed-details", "oldest-executed", "most-recent-executed",
			"remaining", "not-executed", "not-executed-details", "cancelled", "oldest-cancelled", "most-recent-cancelled",
			"cancelled-details", "estimated-completion-current-job", "estimated-completion",
			"failed", "failed-details", "oldest-due-age-seconds"} {
			assert.Contains(t, m["queue"], k)
		}
		assert.Contains(t, m["errors"], "number")
		assert.Nil(t, m["queue"]["oldest-executed"], "no such job: null")
		assert.Equal(t, map[string]any{}, m["queue"]["executed-details"])
		assert.Equal(t, d.Kind, m["database"]["name"])

		a1 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "a1"))
		a2 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "a2"))
		c1 := mustSchedule(t, d.DB, parityRecord, async.Args(log, "c1"))
		c2 := mustSchedule(t, d.DB, parityKw, async.Args(log))
		f1 := mustSchedule(t, d.DB, parityFail, async.Args(log, "f1"), async.MaxAttempts(1))
		f2 := mustSchedule(t, d.DB, parityFail, async.Args(log, "f2"), async.MaxAttempts(3))
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "p1"))
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "p2"), async.RunAfter(frozenNow(d).Add(time.Hour)))
		d.Clock.Advance(time.Minute)
		require.NoError(t, a2.Execute(d.DB))
		d.Clock.Advance(time.Minute)
		require.NoError(t, a1.Execute(d.DB))
		d.Clock.Advance(time.Minute)
		_, err = async.Deschedule(d.DB, parityRecord, async.Args(log, "c1"))
		require.NoError(t, err)
		d.Clock.Advance(time.Minute)
		_, err = async.Deschedule(d.DB, parityKw, async.Args(log))
		require.NoError(t, err)
		require.Error(t, f1.Execute(d.DB))
		require.Error(t, f2.Execute(d.DB))

		q := health(t, d).Queue
		assert.EqualValues(t, 8, q.AllJobs)
		assert.EqualValues(t, 2, q.Executed)
		assert.Equal(t, map[string]async.NameCount{recName: {Count: 2}}, q.ExecutedDetails)
		require.NotNil(t, q.OldestExecuted)
		assert.Equal(t, a2.ID, q.OldestExecuted.ID)
		assert.Equal(t, a1.ID, q.MostRecentExecuted.ID)
		assert.EqualValues(t, 3, q.Remaining, "f2 (waiting to retry), p1 and p2")
		assert.EqualValues(t, 3, q.NotExecuted)
		assert.Equal(t, map[string]async.NameCount{recName: {Count: 2}, failName: {Count: 1}}, q.NotExecutedDetails)
		assert.EqualValues(t, 2, q.Cancelled)
		assert.Equal(t, map[string]async.NameCount{recName: {Count: 1}, parityKwName: {Count: 1}}, q.CancelledDetails,
			"cancelled-details counts cancelled jobs (the reference counted the others)")
		assert.Equal(t, c1.ID, q.OldestCancelled.ID)
		assert.Equal(t, c2.ID, q.MostRecentCancelled.ID)
		assert.EqualValues(t, 1, q.Failed)
		assert.Equal(t, map[string]async.NameCount{failName: {Count: 1}}, q.FailedDetails)
		assert.EqualValues(t, 2, health(t, d).Errors.Number)

		// Links: the id by default, Plugin.JobLink when set.
		raw, err = json.Marshal(q)
		require.NoError(t, err)
		var qm map[string]any
		require.NoError(t, json.Unmarshal(raw, &qm))
		assert.EqualValues(t, a2.ID, qm["oldest-executed"])
		assert.Equal(t, map[string]any{"count": float64(2)}, qm["executed-details"].(map[string]any)[recName])
		plugin(t, d).JobLink = func(id int64) string { return fmt.Sprintf("/admin/async/job/%d/", id) }
		q = health(t, d).Queue
		assert.Equal(t, fmt.Sprintf("/admin/async/job/%d/", c2.ID), q.MostRecentCancelled.Link)
		raw, err = json.Marshal(q)
		require.NoError(t, err)
		require.NoError(t, json.Unmarshal(raw, &qm))
		assert.Equal(t, fmt.Sprintf("/admin/async/job/%d/", a1.ID), qm["most-recent-executed"])
		var back async.QueueHealth
		require.NoError(t, json.Unmarshal(raw, &back))
		assert.Equal(t, &async.JobRef{Link: q.MostRecentExecuted.Link}, back.MostRecentExecuted, "a link reads back as a link")
	})
}

// Point 6: oldest-due-age-seconds is the age of the oldest job a claim could
// take now: due since its scheduled time (or since added); future jobs and
// final jobs waiting for their group do not count.
func TestHealthOldestDueAge(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		t0 := freezeClock(d)
		_, err := async.OnCompletion(d.DB, "g", parityRecord, async.Args(log, "final"))
		require.NoError(t, err)
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "member"), async.InGroup("g"), async.RunAfter(t0.Add(10*time.Hour)))
		// Due since t0 but held by a worker's claim: not waiting to be taken.
		held := mustSchedule(t, d.DB, parityRecord, async.Args(log, "held"))
		claimed, err := async.ClaimForTest(d.DB, "a-worker", 1)
		require.NoError(t, err)
		require.Len(t, claimed, 1)
		require.Equal(t, held.ID, claimed[0].ID)
		d.Clock.Advance(time.Hour)
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "j1"))
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "j2"), async.RunAfter(t0.Add(30*time.Minute)))
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "j3"), async.RunAfter(t0.Add(2*time.Hour)))
		d.Clock.Advance(time.Hour)

		age := health(t, d).Queue.OldestDueAgeSeconds
		require.NotNil(t, age)
		assert.InDelta(t, 90*60, *age, 0.001, "j2, due since t0+30m (the held final job and the claimed job, added at t0, do not count)")
		_, err = async.Deschedule(d.DB, parityRecord, async.Args(log, "j2"))
		require.NoError(t, err)
		age = health(t, d).Queue.OldestDueAgeSeconds
		require.NotNil(t, age)
		assert.InDelta(t, 60*60, *age, 0.001, "j1, added at t0+1h")
		_, err = async.Deschedule(d.DB, parityRecord, async.Args(log, "j1"))
		require.NoError(t, err)
		// j3 became due at t0+2h, now.
		age = health(t, d).Queue.OldestDueAgeSeconds
		require.NotNil(t, age)
		assert.InDelta(t, 0, *age, 0.001)
		_, err = async.Deschedule(d.DB, parityRecord, async.Args(log, "j3"))
		require.NoError(t, err)
		assert.Nil(t, health(t, d).Queue.OldestDueAgeSeconds, "only a future job, a held final job and a claimed job remain")
	})
}

// Point 6: the rough estimate: pending jobs × (average run + average wait)
// of the jobs executed in the last day, with full durations; jobs without a
// start time are ignored instead of crashing; negative waits count as zero.
func TestHealthRoughEstimate(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		key := freshLog(t)
		t0 := freezeClock(d)
		tickClocks.Store(key, d.Clock)
		// Outside the one-day window: a long run two days ago.
		old := mustSchedule(t, d.DB, parityTick, async.Args(key, 0))
		set(t, d, old.ID, map[string]any{"started": t0.Add(-50 * time.Hour), "executed": t0.Add(-48 * time.Hour)})
		// Executed without a start time, and run early (started before scheduled).
		nostart := mustSchedule(t, d.DB, parityTick, async.Args(key, 0))
		set(t, d, nostart.ID, map[string]any{"executed": t0.Add(-time.Hour)})

		j1 := mustSchedule(t, d.DB, parityTick, async.Args(key, 10), async.RunAfter(t0))
		mustSchedule(t, d.DB, parityTick, async.Args(key, 30))
		d.Clock.Advance(20 * time.Second)
		assert.Equal(t, 2, flush(t, d, async.FlushOptions{}))
		got := jobState(t, d, j1.ID)
		require.NotNil(t, got.Started)
		assert.Equal(t, 20*time.Second, got.Started.Sub(t0), "j1 waited 20 s after its scheduled time")

		early := mustSchedule(t, d.DB, parityTick, async.Args(key, 0), async.RunAfter(frozenNow(d).Add(time.Hour)))
		require.NoError(t, early.Execute(d.DB)) // started an hour before scheduled: wait 0, run 0

		// Pending: two due, one in the future; cancelled and failed jobs do not count.
		mustSchedule(t, d.DB, parityTick, async.Args(key, 1))
		mustSchedule(t, d.DB, parityRecord, async.Args(key, "x"))
		mustSchedule(t, d.DB, parityRecord, async.Args(key, "y"), async.RunAfter(frozenNow(d).Add(48*time.Hour)))
		mustSchedule(t, d.DB, parityRecord, async.Args(key, "cancel"))
		_, err := async.Deschedule(d.DB, parityRecord, async.Args(key, "cancel"))
		require.NoError(t, err)

		// Three runs in the window: run (10+30+0)/3, wait 20/3.
		q := health(t, d).Queue
		assert.InDelta(t, 3*(40.0/3+20.0/3), q.EstimatedCompletion, 0.011)
		assert.Equal(t, async.AlgorithmRough, q.EstimationAlgorithm)
		assert.Zero(t, q.EstimatedCompletionCurrentJob)
	})
}

// Point 6: the precise estimate: remaining time of open groups (full days,
// extrapolated from the done jobs), completed groups adding nothing, plus
// the running jobs, plus ungrouped pending jobs × the average run of their
// task.
func TestHealthPreciseEstimate(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		key := freshLog(t)
		freezeClock(d)
		tickClocks.Store(key, d.Clock)
		// A run of 50 s of the ungrouped jobs' task, in a group (now
		// complete): the averages of ungrouped jobs leave it out.
		grouped := mustSchedule(t, d.DB, parityTick, async.Args(key, 50), async.InGroup("ticked"))
		require.NoError(t, grouped.Execute(d.DB))
		t0 := frozenNow(d)
		// An open group, one of four jobs done after two days.
		var big []*async.Job
		for i := 0; i < 4; i++ {
			big = append(big, mustSchedule(t, d.DB, parityRecord, async.Args(key, fmt.Sprint("big", i)), async.InGroup("big")))
		}
		// A completed group and a group whose jobs were all cancelled.
		done := mustSchedule(t, d.DB, parityRecord, async.Args(key, "done"), async.InGroup("done"))
		mustSchedule(t, d.DB, parityRecord, async.Args(key, "gone"), async.InGroup("gone"))
		_, err := async.Deschedule(d.DB, parityRecord, async.Args(key, "gone"))
		require.NoError(t, err)
		// An open group with no job done yet: nothing to extrapolate from.
		mustSchedule(t, d.DB, parityRecord, async.Args(key, "fresh"), async.InGroup("fresh"))
		d.Clock.Advance(48 * time.Hour)
		require.NoError(t, done.Execute(d.DB))
		require.NoError(t, big[0].Execute(d.DB))
		d.Clock.Advance(24 * time.Hour)

		// Ungrouped: two runs of 10 s, three pending of the same task, one
		// of a task with no history.
		mustSchedule(t, d.DB, parityTick, async.Args(key, 10))
		mustSchedule(t, d.DB, parityTick, async.Args(key, 10))
		assert.Equal(t, 2, flush(t, d, async.FlushOptions{Filter: tickName}))
		for i := 0; i < 3; i++ {
			mustSchedule(t, d.DB, parityTick, async.Args(key, 100+i))
		}
		mustSchedule(t, d.DB, parityRecord, async.Args(key, "no-history"))
		// A pending job of that task in the open group "fresh" is not
		// counted with the ungrouped ones.
		mustSchedule(t, d.DB, parityTick, async.Args(key, 300), async.InGroup("fresh"))
		now := frozenNow(d)
		// Running jobs (a start time, still pending): 10 - 4 = 6 s left, and
		// one past its average, which counts as zero.
		r1 := mustSchedule(t, d.DB, parityTick, async.Args(key, 200))
		set(t, d, r1.ID, map[string]any{"started": now.Add(-4 * time.Second)})
		r2 := mustSchedule(t, d.DB, parityTick, async.Args(key, 201))
		set(t, d, r2.ID, map[string]any{"started": now.Add(-time.Minute)})

		q := health(t, d, async.Algorithm(async.AlgorithmPrecise)).Queue
		assert.Equal(t, async.AlgorithmPrecise, q.EstimationAlgorithm)
		assert.InDelta(t, 6, q.EstimatedCompletionCurrentJob, 0.011)
		consumed := now.Sub(t0).Seconds() // three days
		assert.InDelta(t, 3*consumed+6+3*10, q.EstimatedCompletion, 0.011)

		// The same queue, rough: 9 pending jobs without a start time (3+1
		// ungrouped, 3 in "big", 2 in "fresh") × the 10 s average of the two
		// runs of the last day (no waits).
		q = health(t, d, async.Algorithm(async.AlgorithmRough)).Queue
		assert.InDelta(t, 9*10, q.EstimatedCompletion, 0.011)
	})
}

// Point 6: an unknown algorithm is an error wrapping ErrUnknownAlgorithm,
// and the HTTP handler takes ?algorithm=.
func TestHealthAlgorithmOptionAndHandler(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		key := freshLog(t)
		freezeClock(d)
		tickClocks.Store(key, d.Clock)
		_, err := async.Health(d.DB, async.Algorithm("exact"))
		require.ErrorIs(t, err, async.ErrUnknownAlgorithm)
		assert.Regexp(t, `^async: `, err.Error())

		// An open group of two jobs, one done after an hour: precise says
		// one more hour, rough says nothing (no ungrouped history).
		j := mustSchedule(t, d.DB, parityRecord, async.Args(key, "1"), async.InGroup("h"))
		mustSchedule(t, d.DB, parityRecord, async.Args(key, "2"), async.InGroup("h"))
		d.Clock.Advance(time.Hour)
		require.NoError(t, j.Execute(d.DB))

		srv := httptest.NewServer(async.HealthHandler(d.DB))
		defer srv.Close()
		get := func(query string) (int, map[string]map[string]any) {
			resp, err := http.Get(srv.URL + "/health" + query)
			require.NoError(t, err)
			defer resp.Body.Close()
			var m map[string]map[string]any
			if resp.StatusCode == http.StatusOK {
				assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))
				require.NoError(t, json.NewDecoder(resp.Body).Decode(&m))
			}
			return resp.StatusCode, m
		}
		code, m := get("")
		require.Equal(t, http.StatusOK, code)
		assert.Equal(t, "rough", m["queue"]["estimation-algorithm"])
		assert.EqualValues(t, 0, m["queue"]["estimated-completion"])
		code, m = get("?algorithm=precise")
		require.Equal(t, http.StatusOK, code)
		assert.InDelta(t, 3600, m["queue"]["estimated-completion"], 0.011)
		assert.EqualValues(t, 2, m["queue"]["all-jobs"])
		code, _ = get("?algorithm=exact")
		assert.Equal(t, http.StatusBadRequest, code)
	})
}
