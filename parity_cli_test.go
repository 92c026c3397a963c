package async_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/gormasync/async"
)

func run(d *testDB, args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := async.RunCommand(context.Background(), d.DB, args, &out, &errb)
	return code, out.String(), errb.String()
}

// Point 5: flush_queue's flags, its "id: text form" output, and its exit
// status: non-zero when it stopped at a failing job.
func TestRunCommandFlushQueue(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		var jobs []*async.Job
		for i := 0; i < 4; i++ {
			jobs = append(jobs, mustSchedule(t, d.DB, parityRecord, async.Args(log, fmt.Sprint(i))))
		}
		mustSchedule(t, d.DB, "a_b.x", async.Args(log, "other"))

		code, out, _ := run(d, "flush_queue", "--jobs", "2", "--filter", recName)
		require.Equal(t, 0, code)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		require.Len(t, lines, 3)
		assert.Equal(t, fmt.Sprintf("%d: %s", jobs[0].ID, jobs[0]), lines[0])
		assert.Equal(t, fmt.Sprintf("%d: %s(%q, \"1\")", jobs[1].ID, recName, log), lines[1])
		assert.Equal(t, "2 job(s) executed", lines[2])
		assert.Equal(t, []string{"0", "1"}, logged(log))

		// Short flags, as in the reference: -j -w -o -f.
		var even *async.Job
		for _, j := range jobs[2:] {
			if j.ID%2 == 0 {
				even = j
			}
		}
		require.NotNil(t, even)
		code, out, _ = run(d, "flush_queue", "-j", "5", "-w", "2", "-o", "2", "-f", recName)
		require.Equal(t, 0, code)
		assert.Contains(t, out, fmt.Sprintf("%d: ", even.ID))
		assert.Contains(t, out, "1 job(s) executed")

		code, out, _ = run(d, "flush_queue", "-f", "nothing.")
		assert.Equal(t, 0, code)
		assert.Equal(t, "No jobs to execute\n", out)

		mustSchedule(t, d.DB, parityFail, async.Args(log, "boom"))
		code, _, errOut := run(d, "flush_queue", "-f", failName)
		assert.Equal(t, 1, code, "a failing job makes the exit status non-zero")
		assert.Contains(t, errOut, "stopped")
		assert.Contains(t, errOut, "parity failure boom")

		code, _, _ = run(d, "flush_queue", "--no-such-flag")
		assert.Equal(t, 2, code)
	})
}

// Point 5: a flush_queue whose partition is held prints the reference's
// message and exits 0.
func TestRunCommandFlushQueueBusy(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		log := freshLog(t)
		mustSchedule(t, d.DB, parityRecord, async.Args(log, "held"))
		g := newGate(log)
		codes := make(chan int, 1)
		go func() {
			var errb bytes.Buffer
			codes <- async.RunCommand(context.Background(), d.DB, []string{"flush_queue"}, &blockingWriter{g: g}, &errb)
		}()
		waitStarted(t, g)
		code, out, _ := run(d, "flush_queue")
		assert.Equal(t, 0, code)
		assert.Equal(t, "Lock is already set, aborting.\n", out)
		close(g.release)
		assert.Equal(t, 0, <-codes)
		assert.Equal(t, []string{"held"}, logged(log))
	})
}

// Point 6: queue_health prints the health as JSON, with the precise
// estimate unless --algorithm (or -a) says rough; an unknown algorithm is
// a usage error.
func TestRunCommandQueueHealth(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		mustSchedule(t, d.DB, parityRecord, async.Args(freshLog(t), "x"))
		algorithm := func(args ...string) string {
			code, out, errOut := run(d, append([]string{"queue_health"}, args...)...)
			require.Equal(t, 0, code, errOut)
			var m map[string]map[string]any
			require.NoError(t, json.Unmarshal([]byte(out), &m))
			assert.EqualValues(t, 1, m["queue"]["all-jobs"])
			return m["queue"]["estimation-algorithm"].(string)
		}
		assert.Equal(t, "precise", algorithm(), "the command's default, as in the reference")
		assert.Equal(t, "rough", algorithm("--algorithm", "rough"))
		assert.Equal(t, "rough", algorithm("-a", "rough"))
		assert.Equal(t, "precise", algorithm("--algorithm=precise"))

		code, out, errOut := run(d, "queue_health", "--algorithm", "exact")
		assert.Equal(t, 2, code)
		assert.Empty(t, out)
		assert.Contains(t, errOut, "unknown estimation algorithm")
		assert.Contains(t, errOut, `"exact"`)

		code, _, _ = run(d, "no_such_command")
		assert.Equal(t, 2, code)
	})
}

// Usage errors exit 2, as RunCommand's doc says: a JOB_ID that is not a
// number, a negative --jobs or --outof, an argument a command does not take.
func TestCLIUsageErrorsExit2(t *testing.T) {
	d := newTestDB(t, "sqlite", nil)
	for _, args := range [][]string{
		{"retry", "abc"},
		{"flush_queue", "--jobs", "-1"},
		{"flush_queue", "--outof", "-1"},
		{"flush_queue", "extra"},
		{"queue_health", "extra"},
	} {
		code, _, errOut := run(d, args...)
		assert.Equal(t, 2, code, "%v: %s", args, errOut)
	}
}
