package async

import (
	"context"
	"errors"
	mrand "math/rand/v2"
	"strings"
	"time"
)

// deadlockRetries is how many times a claim's transaction is run again after
// the database chose it as a deadlock victim.
const deadlockRetries = 3

// retryDeadlock runs fn, a whole transaction (or a statement on its own),
// again when the database rolled it back to break a deadlock: nothing of it
// was committed, so running it again is safe. A job's run is never retried
// this way: its task has effects outside the database; a failed run is
// recorded and rescheduled instead.
func retryDeadlock(ctx context.Context, fn func() error) error {
	for i := 0; ; i++ {
		err := fn()
		if err == nil || i == deadlockRetries || !isDeadlock(err) {
			return err
		}
		t := time.NewTimer(time.Duration(1+mrand.IntN(4<<i)) * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
	}
}

// isDeadlock reports whether err is a deadlock that rolled the transaction
// back: SQLSTATE 40P01 on Postgres, error 1213 on MySQL and MariaDB. The
// MySQL driver's error is recognised by its text ("Error 1213 ..."), so
// that the plugin does not link the MySQL driver into programs that use
// another database.
func isDeadlock(err error) bool {
	var pg interface{ SQLState() string }
	if errors.As(err, &pg) && pg.SQLState() == "40P01" {
		return true
	}
	for e := err; e != nil; e = errors.Unwrap(e) {
		if msg := e.Error(); strings.HasPrefix(msg, "Error 1213 ") || strings.HasPrefix(msg, "Error 1213:") {
			return true
		}
	}
	return false
}

// txAborted reports whether err says that the transaction was already
// aborted by an earlier failed statement (Postgres, SQLSTATE 25P02): the
// statement that failed is not the one at fault.
func txAborted(err error) bool {
	var pg interface{ SQLState() string }
	return errors.As(err, &pg) && pg.SQLState() == "25P02"
}
