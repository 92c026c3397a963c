package async_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// On SQLite, the library's work in the caller's transaction that reads
// before it writes (joining a group, Deschedule's locking read) takes the
// write lock first, as its own transactions do: otherwise, while another
// connection (a running job's) holds the write lock, the read opens a
// snapshot, and the write then fails at once with SQLITE_BUSY instead of
// waiting for busy_timeout, since SQLite does not wait to upgrade a
// reading transaction. Found by TestStress.
func TestSQLiteCallerTransactionWaitsForTheWriter(t *testing.T) {
	for _, c := range []struct {
		name string
		work func(tx *gorm.DB) error
	}{
		{"Schedule InGroup", func(tx *gorm.DB) error {
			_, err := async.Schedule(tx, writeEffect, async.Args("k", 1), async.InGroup("g"))
			return err
		}},
		{"ScheduleMany InGroup", func(tx *gorm.DB) error {
			_, err := async.ScheduleMany(tx, async.Task(writeEffect, async.Args("k", 1), async.InGroup("g")))
			return err
		}},
		{"OnCompletion", func(tx *gorm.DB) error {
			_, err := async.OnCompletion(tx, "g", writeEffect, async.Args("k", 1))
			return err
		}},
		{"Deschedule", func(tx *gorm.DB) error {
			_, err := async.Deschedule(tx, writeEffect, async.Args("k", 1))
			return err
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := newTestDB(t, "sqlite", nil)
			_, err := async.Schedule(d.DB, writeEffect, async.Args("k", 1))
			require.NoError(t, err)

			// Another connection holds the write lock, as a running job does.
			other := openDB(t, "sqlite", d.DSN, nil)
			sqlDB, err := other.DB()
			require.NoError(t, err)
			ctx := context.Background()
			holder, err := sqlDB.Conn(ctx)
			require.NoError(t, err)
			defer holder.Close()
			_, err = holder.ExecContext(ctx, "BEGIN IMMEDIATE")
			require.NoError(t, err)

			done := make(chan error, 1)
			go func() { done <- d.DB.Transaction(c.work) }()
			select {
			case err := <-done:
				t.Fatalf("returned while another connection held the write lock, instead of waiting for it: %v", err)
			case <-time.After(300 * time.Millisecond):
			}
			_, err = holder.ExecContext(ctx, "COMMIT")
			require.NoError(t, err)
			require.NoError(t, recv(t, done, 10*time.Second, "the transaction"))
		})
	}
}
