package async_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// The run's transaction belongs to the run: tasks nest transactions
// (savepoints) but cannot commit or roll back the job's own.

func commitsItself(ctx context.Context, tx *gorm.DB, key string) error {
	if err := tx.Create(&Effect{K: key}).Error; err != nil {
		return err
	}
	if err := tx.Commit().Error; err != nil {
		return err
	}
	return nil
}

func rollsBackItself(ctx context.Context, tx *gorm.DB, key string) error {
	if err := tx.Create(&Effect{K: key}).Error; err != nil {
		return err
	}
	return tx.Rollback().Error
}

func nestsTransactions(ctx context.Context, tx *gorm.DB, key string) error {
	inner := tx.Transaction(func(tx *gorm.DB) error {
		if err := tx.Create(&Effect{K: key + "-inner"}).Error; err != nil {
			return err
		}
		return errors.New("inner step fails")
	})
	if inner == nil {
		return errors.New("the inner transaction should have failed")
	}
	return tx.Create(&Effect{K: key + "-outer"}).Error
}

// swallowsFailedStatement ignores a failed statement's error and reports
// success.
func swallowsFailedStatement(ctx context.Context, tx *gorm.DB, key string) error {
	if err := tx.Create(&Effect{K: key}).Error; err != nil {
		return err
	}
	_ = tx.Exec("INSERT INTO no_such_table (x) VALUES (1)").Error
	return nil
}

func init() {
	async.MustRegister(commitsItself)
	async.MustRegister(rollsBackItself)
	async.MustRegister(nestsTransactions)
	async.MustRegister(swallowsFailedStatement)
}

func TestTaskCannotEndItsJobsTransaction(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		for _, task := range []any{commitsItself, rollsBackItself} {
			job, err := async.Schedule(d.DB, task, async.Args("k"))
			require.NoError(t, err)
			err = job.Execute(d.DB)
			require.ErrorIs(t, err, async.ErrJobTransaction)
			got := getJob(t, d.DB, job.ID)
			assert.Nil(t, got.Executed)
			assert.EqualValues(t, 1, count(t, d.DB, "async_error", "job_id = ?", job.ID))
			assert.Zero(t, count(t, d.DB, "effects", ""), "the write before the refused commit must be rolled back")
		}
	})
}

func TestTaskNestedTransactionIsASavepoint(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		job, err := async.Schedule(d.DB, nestsTransactions, async.Args("n"))
		require.NoError(t, err)
		require.NoError(t, job.Execute(d.DB))
		assert.NotNil(t, getJob(t, d.DB, job.ID).Executed)
		assert.Zero(t, count(t, d.DB, "effects", "k = ?", "n-inner"), "the failed inner transaction is rolled back")
		assert.EqualValues(t, 1, count(t, d.DB, "effects", "k = ?", "n-outer"), "the rest commits with the job")
	})
}

// A task that swallows a failed statement: on Postgres the statement aborted
// the transaction, so the completion (sent with COMMIT) fails and the
// failure is recorded with nothing of the task kept. MySQL and SQLite undo
// only the failed statement, so the job completes with its other write.
func TestSwallowedStatementFailure(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		for _, batch := range []int{1, 2} {
			t.Logf("batch size %d", batch)
			jobs := make([]*async.Job, batch)
			for i := range jobs {
				var err error
				jobs[i], err = async.Schedule(d.DB, swallowsFailedStatement, async.Args(fmt.Sprintf("s%d", i)))
				require.NoError(t, err)
			}
			pg := d.Kind == "postgres"
			if batch == 1 {
				err := jobs[0].Execute(d.DB)
				if pg {
					require.Error(t, err)
				} else {
					require.NoError(t, err)
				}
			} else {
				ctx, stop := context.WithCancel(context.Background())
				w, err := async.NewWorker(d.DB, async.WorkerOptions{Concurrency: 1, BatchSize: batch, BatchWindow: time.Minute, PollInterval: 20 * time.Millisecond})
				require.NoError(t, err)
				done := make(chan error, 1)
				go func() { done <- w.Run(ctx) }()
				waitFor(t, 30*time.Second, "both jobs to run", func() bool {
					if pg {
						return count(t, d.DB, "async_error", "") == int64(batch)
					}
					return count(t, d.DB, "async_job", "executed IS NOT NULL") == int64(batch)
				})
				stop()
				require.NoError(t, <-done)
			}
			for _, j := range jobs {
				got := getJob(t, d.DB, j.ID)
				if pg {
					assert.Nil(t, got.Executed)
					assert.EqualValues(t, 1, count(t, d.DB, "async_error", "job_id = ?", j.ID))
				} else {
					assert.NotNil(t, got.Executed)
					assert.Zero(t, count(t, d.DB, "async_error", "job_id = ?", j.ID))
				}
			}
			if pg {
				assert.Zero(t, count(t, d.DB, "effects", ""))
			} else {
				assert.EqualValues(t, batch, count(t, d.DB, "effects", ""))
			}
			require.NoError(t, d.DB.Exec("DELETE FROM effects").Error)
			require.NoError(t, d.DB.Exec("DELETE FROM async_job").Error)
			require.NoError(t, d.DB.Exec("DELETE FROM async_error").Error)
		}
	})
}
