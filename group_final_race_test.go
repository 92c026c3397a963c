package async_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// A job added to a group whose final job is claimed or running (a group
// whose only job is its final job runs it at once; so does a group whose
// other jobs are done but one is just being added) must not end up in that
// group, pending, after its final job ran: the final job runs only after
// every other job of its group. Found by TestStress.

// assertFinalRanLast checks that every other job of final's group ended
// before final started.
func assertFinalRanLast(t *testing.T, d *testDB, finalID int64) {
	t.Helper()
	f := getJob(t, d.DB, finalID)
	require.NotNil(t, f.Executed, "the final job ran")
	var others []async.Job
	require.NoError(t, d.DB.Where("group_id = ? AND id <> ?", *f.GroupID, f.ID).Find(&others).Error)
	for _, o := range others {
		end := o.Executed
		if end == nil {
			end = o.Cancelled
		}
		if end == nil {
			end = o.Failed
		}
		if assert.NotNil(t, end, "job %d of the final job's group is still pending", o.ID) {
			assert.False(t, end.After(*f.Started), "job %d of the group ended after the final job started", o.ID)
		}
	}
}

// The final job is running (strict mode: its row is locked) while another
// transaction adds a job to its group: the job goes to the reference's next
// generation once the final job has committed.
func TestJobAddedWhileGroupFinalRunsWaitsForIt(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		ref, kf, km := newKey(t, "g"), newKey(t, "final"), newKey(t, "member")
		added := make(chan *async.Job, 1)
		var m *async.Job // added while the final job ran
		on(t, kf, func(ctx context.Context, run int64) error {
			if run == 1 {
				go func() {
					j, err := async.Schedule(d.DB, ctlNoWrite, async.Args(km), async.InGroup(ref))
					assert.NoError(t, err)
					added <- j
				}()
				select { // the other transaction commits at once, or waits for this one
				case m = <-added:
				case <-time.After(300 * time.Millisecond):
				}
			}
			return nil
		})
		f, err := async.OnCompletion(d.DB, ref, ctlNoWrite, async.Args(kf))
		require.NoError(t, err)
		n, err := async.FlushQueue(d.DB, async.FlushOptions{Jobs: 1})
		require.NoError(t, err)
		require.Equal(t, 1, n)
		if m == nil {
			m = recv(t, added, 30*time.Second, "the job added to the group")
		}
		_, err = async.FlushQueue(d.DB, async.FlushOptions{})
		require.NoError(t, err)
		assertFinalRanLast(t, d, f.ID)
		assert.NotEqual(t, *f.GroupID, *m.GroupID, "the job joined the next generation")
	})
}

// The final job was claimed (here by a group-commit batch, whose rows are
// not locked while its tasks run) when another transaction adds a job to
// its group: the claim is taken back, and the final job runs after the new
// job instead of in its batch.
func TestJobAddedToGroupTakesBackItsClaimedFinal(t *testing.T) {
	eachServerDB(t, "the other transaction commits while the batch runs, which SQLite's one writer rules out", func(t *testing.T, d *testDB) {
		ref, kf, km, kx := newKey(t, "g"), newKey(t, "final"), newKey(t, "member"), newKey(t, "x")
		on(t, kf, func(ctx context.Context, run int64) error {
			if run == 1 {
				_, err := async.Schedule(d.DB, ctlNoWrite, async.Args(km), async.InGroup(ref))
				assert.NoError(t, err)
			}
			return nil
		})
		f, err := async.OnCompletion(d.DB, ref, ctlNoWrite, async.Args(kf), async.Priority(9))
		require.NoError(t, err)
		_, err = async.Schedule(d.DB, ctlNoWrite, async.Args(kx))
		require.NoError(t, err)
		startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, BatchSize: 2, BatchWindow: time.Minute, PollInterval: 20 * time.Millisecond})
		waitFor(t, 30*time.Second, "the queue to drain", func() bool {
			return count(t, d.DB, "async_job", "executed IS NULL AND cancelled IS NULL AND failed IS NULL") == 0
		})
		assertFinalRanLast(t, d, f.ID)
	})
}

// finalAddsToItsGroup is a final job whose first run adds a job to its own
// group's reference, through its own transaction.
func finalAddsToItsGroup(ctx context.Context, tx *gorm.DB, ref, key string) error {
	if incRun(key) == 1 {
		_, err := async.Schedule(tx, ctlNoWrite, async.Args(key+"/added"), async.InGroup(ref))
		return err
	}
	return nil
}

func init() { async.MustRegister(finalAddsToItsGroup) }

// A final job whose own task schedules a job with its group's reference
// (here its group's only job) ends its group: the job goes to the next
// generation, in strict mode and with group commit alike, and the final
// job runs once.
func TestFinalJobAddingToItsOwnGroupStartsTheNextGeneration(t *testing.T) {
	for _, mode := range []struct {
		name  string
		batch int
	}{{"strict", 1}, {"group commit", 2}} {
		t.Run(mode.name, func(t *testing.T) {
			eachDB(t, func(t *testing.T, d *testDB) {
				ref, kf := newKey(t, "g"), newKey(t, "final")
				f, err := async.OnCompletion(d.DB, ref, finalAddsToItsGroup, async.Args(ref, kf), async.Priority(9))
				require.NoError(t, err)
				_, err = async.Schedule(d.DB, ctlNoWrite, async.Args(newKey(t, "x")))
				require.NoError(t, err)
				startWorker(t, d.DB, async.WorkerOptions{Concurrency: 1, BatchSize: mode.batch, BatchWindow: time.Minute, PollInterval: 20 * time.Millisecond})
				waitFor(t, 30*time.Second, "the queue to drain", func() bool {
					return count(t, d.DB, "async_job", "executed IS NULL AND cancelled IS NULL AND failed IS NULL") == 0
				})
				assertFinalRanLast(t, d, f.ID)
				var added async.Job
				require.NoError(t, d.DB.Where("args = ?", `["`+kf+`/added"]`).Take(&added).Error)
				assert.NotEqual(t, *f.GroupID, *added.GroupID, "the added job is in the next generation")
				assert.EqualValues(t, 1, runCount(kf), "the final job ran once")
			})
		})
	}
}
