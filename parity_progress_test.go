package async_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/gormasync/async"
)

func progress(t testing.TB, d *testDB, ref string) *async.Progress {
	t.Helper()
	p, err := async.GroupProgress(d.DB, ref)
	require.NoError(t, err)
	return p
}

// Point 3: GroupProgress counts the latest group's jobs, its jobs with
// errors, and estimates its times with whole days.
func TestGroupProgressCountsAndEstimates(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		_, err := async.GroupProgress(d.DB, "report")
		require.ErrorIs(t, err, async.ErrGroupNotFound)

		t0 := freezeClock(d)
		ok := mustSchedule(t, d.DB, parityRecord, async.Args(log, "ok"), async.InGroup("report"))
		retrying := mustSchedule(t, d.DB, parityFail, async.Args(log, "retrying"), async.InGroup("report"), async.MaxAttempts(5))
		failed := mustSchedule(t, d.DB, parityFail, async.Args(log, "failed"), async.InGroup("report"), async.MaxAttempts(1))
		waiting := mustSchedule(t, d.DB, parityRecord, async.Args(log, "waiting"), async.InGroup("report"))

		p := progress(t, d, "report")
		assert.EqualValues(t, 4, p.TotalJobs)
		assert.Nil(t, p.ConsumedSeconds, "no job done: nothing to extrapolate from")
		assert.Nil(t, p.RemainingSeconds)
		assert.Nil(t, p.LatestJobCompleted)

		d.Clock.Advance(time.Hour)
		require.NoError(t, ok.Execute(d.DB))
		require.Error(t, retrying.Execute(d.DB))
		require.Error(t, failed.Execute(d.DB))
		d.Clock.Advance(47 * time.Hour) // the group is two days old

		p = progress(t, d, "report")
		assert.Equal(t, *ok.GroupID, p.ID)
		assert.Equal(t, "report", p.Reference)
		assert.True(t, t0.Equal(p.Created))
		require.NotNil(t, p.LatestJobCompleted)
		assert.True(t, t0.Add(time.Hour).Equal(*p.LatestJobCompleted))
		assert.EqualValues(t, 4, p.TotalJobs)
		assert.EqualValues(t, 1, p.TotalExecutedJobs)
		assert.EqualValues(t, 3, p.TotalUnexecutedJobs)
		assert.EqualValues(t, 2, p.TotalErrorJobs, "retrying and failed")
		assert.EqualValues(t, 1, p.CurrentErrors, "only retrying is still pending")
		require.NotNil(t, p.ConsumedSeconds)
		assert.InDelta(t, 48*3600, *p.ConsumedSeconds, 0.001, "whole days count")
		// Two of four jobs done (executed, failed) in two days: two more days.
		require.NotNil(t, p.RemainingSeconds)
		assert.InDelta(t, 48*3600, *p.RemainingSeconds, 0.001)

		// Completed: consumed runs to the latest execution (not to a later
		// cancellation), nothing remains.
		d.Clock.Advance(time.Hour)
		require.NoError(t, waiting.Execute(d.DB))
		d.Clock.Advance(time.Hour)
		_, err = async.Deschedule(d.DB, parityFail, async.Args(log, "retrying"))
		require.NoError(t, err)
		p = progress(t, d, "report")
		require.NotNil(t, p.LatestJobCompleted)
		assert.True(t, t0.Add(49*time.Hour).Equal(*p.LatestJobCompleted), "the latest of two executions: %s", p.LatestJobCompleted)
		assert.EqualValues(t, 2, p.TotalExecutedJobs)
		assert.InDelta(t, 49*3600, *p.ConsumedSeconds, 0.001)
		assert.InDelta(t, 0, *p.RemainingSeconds, 0.001)
		assert.EqualValues(t, 0, p.CurrentErrors)
		assert.EqualValues(t, 2, p.TotalErrorJobs)

		// A new generation is the latest group.
		next := mustSchedule(t, d.DB, parityRecord, async.Args(log, "next"), async.InGroup("report"))
		p = progress(t, d, "report")
		assert.Equal(t, *next.GroupID, p.ID)
		assert.EqualValues(t, 1, p.TotalJobs)
		assert.EqualValues(t, 0, p.TotalErrorJobs)
	})
}

// Point 3: a group whose jobs were all cancelled, and a group with no jobs,
// report without crashing.
func TestGroupProgressAllCancelledAndEmpty(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		freezeClock(d)
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "a"), async.InGroup("void"))
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "b"), async.InGroup("void"))
		d.Clock.Advance(5 * time.Minute)
		_, err := async.Deschedule(d.DB, parityRecord, async.Args(log, "a"))
		require.NoError(t, err)
		d.Clock.Advance(5 * time.Minute)
		_, err = async.Deschedule(d.DB, parityRecord, async.Args(log, "b"))
		require.NoError(t, err)
		d.Clock.Advance(time.Hour)
		p := progress(t, d, "void")
		assert.Nil(t, p.LatestJobCompleted)
		assert.EqualValues(t, 2, p.TotalJobs)
		assert.EqualValues(t, 2, p.TotalUnexecutedJobs)
		require.NotNil(t, p.ConsumedSeconds)
		assert.InDelta(t, 600, *p.ConsumedSeconds, 0.001, "until the last cancellation")
		assert.InDelta(t, 0, *p.RemainingSeconds, 0.001)

		require.NoError(t, d.DB.Create(&async.Group{Reference: "empty", Created: frozenNow(d)}).Error)
		p = progress(t, d, "empty")
		assert.Zero(t, p.TotalJobs)
		assert.Nil(t, p.ConsumedSeconds)
		assert.Nil(t, p.RemainingSeconds)
	})
}

// Point 3: the HTTP handler serves the reference's keys; the reference comes
// from the path's last segment or ?reference=; unknown is a 404.
func TestGroupProgressHandler(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		freezeClock(d)
		j := mustSchedule(t, d.DB, parityRecord, async.Args(log, "1"), async.InGroup("daily/eu"))
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "2"), async.InGroup("daily/eu"))
		d.Clock.Advance(26 * time.Hour)
		require.NoError(t, j.Execute(d.DB))

		mux := http.NewServeMux()
		mux.Handle("/async/group/progress/", async.GroupProgressHandler(d.DB))
		srv := httptest.NewServer(mux)
		defer srv.Close()
		get := func(path string) (int, map[string]any) {
			resp, err := http.Get(srv.URL + path)
			require.NoError(t, err)
			defer resp.Body.Close()
			var m map[string]any
			if resp.StatusCode == http.StatusOK {
				assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))
				require.NoError(t, json.NewDecoder(resp.Body).Decode(&m))
			}
			return resp.StatusCode, m
		}
		code, m := get("/async/group/progress/daily%2Feu")
		require.Equal(t, http.StatusOK, code)
		for _, k := range []string{"id", "reference", "created", "latest_job_completed", "total_jobs", "total_executed_jobs",
			"total_unexecuted_jobs", "total_error_jobs", "current_errors", "consumed_seconds", "remaining_seconds"} {
			assert.Contains(t, m, k)
		}
		assert.Equal(t, "daily/eu", m["reference"])
		assert.EqualValues(t, 2, m["total_jobs"])
		assert.EqualValues(t, 1, m["total_executed_jobs"])
		assert.InDelta(t, 26*3600, m["consumed_seconds"], 0.001, "more than a day")
		assert.InDelta(t, 26*3600, m["remaining_seconds"], 0.001)
		_, err := time.Parse(time.RFC3339Nano, m["created"].(string))
		assert.NoError(t, err)

		code, m = get("/async/group/progress/?reference=daily/eu")
		require.Equal(t, http.StatusOK, code)
		assert.Equal(t, "daily/eu", m["reference"])
		code, _ = get("/async/group/progress/nope")
		assert.Equal(t, http.StatusNotFound, code)
		code, _ = get("/async/group/progress/")
		assert.Equal(t, http.StatusBadRequest, code)
	})
}
