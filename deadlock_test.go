package async

import (
	"context"
	"errors"
	"fmt"
	"testing"

	mysqldrv "github.com/go-sql-driver/mysql"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/assert"
)

func TestIsDeadlock(t *testing.T) {
	myDeadlock := &mysqldrv.MySQLError{Number: 1213, SQLState: [5]byte{'4', '0', '0', '0', '1'}, Message: "Deadlock found when trying to get lock; try restarting transaction"}
	for _, c := range []struct {
		err  error
		want bool
	}{
		{myDeadlock, true},
		{fmt.Errorf("async: claiming jobs: %w", myDeadlock), true},
		{&mysqldrv.MySQLError{Number: 1213, Message: "Deadlock found"}, true},
		{&mysqldrv.MySQLError{Number: 1205, Message: "Lock wait timeout exceeded; try restarting transaction"}, false},
		{&pgconn.PgError{Code: "40P01"}, true},
		{fmt.Errorf("wrapped: %w", &pgconn.PgError{Code: "40P01"}), true},
		{&pgconn.PgError{Code: "40001"}, false},
		{errors.New("Error 12130: not a deadlock"), false},
		{nil, false},
	} {
		assert.Equal(t, c.want, isDeadlock(c.err), "%v", c.err)
	}
}

func TestRetryDeadlockRunsTheWholeTransactionAgain(t *testing.T) {
	deadlock := &pgconn.PgError{Code: "40P01"}
	calls := 0
	err := retryDeadlock(context.Background(), func() error {
		calls++
		if calls < 3 {
			return deadlock
		}
		return nil
	})
	assert.NoError(t, err)
	assert.Equal(t, 3, calls, "retried until it went through")

	calls = 0
	other := errors.New("other")
	assert.ErrorIs(t, retryDeadlock(context.Background(), func() error { calls++; return other }), other)
	assert.Equal(t, 1, calls, "other errors are not retried")

	calls = 0
	assert.ErrorIs(t, retryDeadlock(context.Background(), func() error { calls++; return deadlock }), deadlock)
	assert.Equal(t, deadlockRetries+1, calls, "retries are bounded")

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	calls = 0
	assert.ErrorIs(t, retryDeadlock(ctx, func() error { calls++; return deadlock }), deadlock)
	assert.Equal(t, 1, calls, "a cancelled context stops the retries")
}
