package async

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"sync/atomic"
	"time"

	"gorm.io/gorm"
)

// A run's transaction. The library opens it itself rather than through
// GORM's Begin: on Postgres with pgx and on MariaDB, BEGIN travels with the
// run's first statement and COMMIT with its last, one round trip each (see
// dialect_pgx.go, dialect_maria.go); elsewhere the library's statements are
// prepared once per connection (hotsql.go). Tasks get a *gorm.DB on the
// same transaction.

// connTxns holds runs' transactions on a *sql.Conn, each BEGIN sent with a
// run's first statement and each COMMIT with its last (pgxTxns,
// mariaTxns).
type connTxns interface {
	// begin takes a connection from sqlDB and begins a transaction on it
	// with first (a hot-path statement with ? placeholders, or ""),
	// returning the connection and the rows first affected or returned.
	begin(ctx context.Context, sqlDB *sql.DB, first string, args []any) (*sql.Conn, int64, error)
	// commit runs q (if not "") and commits, and with next (if not "")
	// begins the next run's transaction on conn and runs next in it.
	// execErr is q's error and commitErr the commit's (the caller then
	// rolls back what is open); beginErr is the next run's start's (the
	// transaction committed; the caller rolls back), nextN the rows next
	// affected or returned.
	commit(ctx context.Context, conn *sql.Conn, q string, args []any, next string, nextArgs []any) (execErr, commitErr error, nextN int64, beginErr error)
	// rollback rolls back the transaction on conn and returns conn to the
	// pool, or discards it if the rollback failed.
	rollback(ctx context.Context, conn *sql.Conn)
	// runner runs hot-path statements in the transaction on conn, or is
	// nil where GORM runs them.
	runner(conn *sql.Conn) sqlRunner
}

// runTxn is one run's transaction.
type runTxn struct {
	p   *Plugin
	ctx context.Context // the library's statements: never cancelled by shutdown
	// db is the tasks' handle. Its ConnPool is rc, which holds the
	// transaction: on a *sql.Tx or *sql.Conn of the plugin's *sql.DB or,
	// when the plugin cannot reach one, a transaction GORM began.
	db    *gorm.DB
	rc    *runConn
	ended bool
	// tasks is the context of the run's tasks, ended with the transaction
	// by stopTasks; taskDB is their handle on the transaction, whose
	// context taskCtx is the running task's (startTask).
	tasks     context.Context
	stopTasks context.CancelFunc
	taskCtx   *taskContext
	taskDB    *gorm.DB
}

// runConn is the connection pool of a run's *gorm.DB: the run's *sql.Tx, or
// a *sql.Conn holding a transaction the library began on it. Tasks may nest
// transactions (GORM turns them into savepoints) but may not end the job's
// transaction: that is the run's to commit with the job's completion.
type runConn struct {
	gorm.ConnPool
	sqlDB   *sql.DB
	tx      *sql.Tx   // generic: a database/sql transaction
	conn    *sql.Conn // connTxns: a connection with a transaction open
	gtx     *gorm.DB  // a pool the plugin cannot see through: a transaction GORM began
	hasJobs atomic.Bool
	// ended is set once the run's transaction has ended. The connection
	// may then carry the next run's transaction (runChain): a task's handle
	// kept past its run must not reach it.
	ended atomic.Bool
	// lost is the error of a task's statement that ended the run's
	// transaction on the server (a deadlock: see lostTx), if any.
	lost atomic.Pointer[error]
	// running is the id of the job whose task runs on this handle, 0
	// between tasks (holdFinal).
	running atomic.Int64
}

// saw records err, a task's statement's error, if it ended the run's
// transaction, and returns it.
func (c *runConn) saw(err error) error {
	if err != nil && isDeadlock(err) {
		c.lost.CompareAndSwap(nil, &err)
	}
	return err
}

// lostTx returns the error of a task's statement that ended the run's
// transaction, or nil. A deadlock rolls back the whole transaction: on
// Postgres the transaction is then aborted and the completion fails anyway,
// but on MySQL and MariaDB the session runs each later statement on its
// own, so that a task that did not return the error would have its job
// completed, in a transaction of its own, without its writes from before
// the deadlock.
func (t *runTxn) lostTx() error {
	if p := t.rc.lost.Load(); p != nil {
		return fmt.Errorf("async: the database rolled back the job's transaction (%w), and its task went on without returning that error", *p)
	}
	return nil
}

// errRunEnded is what a statement through a task's handle gets once its
// job's run has ended.
var errRunEnded = fmt.Errorf("%w: the job's run has ended; a task's *gorm.DB is valid only while the task runs", ErrJobTransaction)

// endedRow is QueryRowContext's answer after a run's end: a *sql.Row
// carrying errRunEnded, which only database/sql can make, from a pool whose
// one attempt to connect fails with it.
func endedRow(ctx context.Context, q string, args ...any) *sql.Row {
	db := sql.OpenDB(endedConnector{})
	defer db.Close()
	// Not the task's context, which has ended too: its error would say less.
	return db.QueryRowContext(context.WithoutCancel(ctx), q, args...)
}

type endedConnector struct{}

func (endedConnector) Connect(context.Context) (driver.Conn, error) { return nil, errRunEnded }
func (endedConnector) Driver() driver.Driver                        { return nil }

// GetDBConn lets gorm.DB.DB() find the *sql.DB.
func (c *runConn) GetDBConn() (*sql.DB, error) {
	if c.sqlDB == nil && c.gtx != nil {
		return c.gtx.DB()
	}
	return c.sqlDB, nil
}

// ExecContext runs a statement in the run's transaction while it lasts.
func (c *runConn) ExecContext(ctx context.Context, q string, args ...any) (sql.Result, error) {
	if c.ended.Load() {
		return nil, errRunEnded
	}
	res, err := c.ConnPool.ExecContext(ctx, q, args...)
	return res, c.saw(err)
}

// QueryContext runs a query in the run's transaction while it lasts.
func (c *runConn) QueryContext(ctx context.Context, q string, args ...any) (*sql.Rows, error) {
	if c.ended.Load() {
		return nil, errRunEnded
	}
	rows, err := c.ConnPool.QueryContext(ctx, q, args...)
	return rows, c.saw(err)
}

// QueryRowContext runs a query in the run's transaction while it lasts.
func (c *runConn) QueryRowContext(ctx context.Context, q string, args ...any) *sql.Row {
	if c.ended.Load() {
		return endedRow(ctx, q, args...)
	}
	return c.ConnPool.QueryRowContext(ctx, q, args...)
}

// PrepareContext prepares a statement in the run's transaction while it
// lasts.
func (c *runConn) PrepareContext(ctx context.Context, q string) (*sql.Stmt, error) {
	if c.ended.Load() {
		return nil, errRunEnded
	}
	return c.ConnPool.PrepareContext(ctx, q)
}

// Commit refuses: the job's transaction commits with the job's completion.
func (c *runConn) Commit() error {
	return errorf(ErrJobTransaction, "a task cannot commit its job's transaction")
}

// Rollback refuses: a task fails by returning an error.
func (c *runConn) Rollback() error {
	return errorf(ErrJobTransaction, "a task cannot roll back its job's transaction; return an error instead")
}

// beginRun opens a run's transaction and runs first (a hot-path statement
// with ? placeholders, or "") in it, returning the rows first affected.
func (p *Plugin) beginRun(ctx context.Context, first string, args ...any) (*runTxn, int64, error) {
	t := &runTxn{p: p, ctx: ctx}
	if p.sqlDB == nil {
		// A pool the plugin cannot see through: GORM begins the
		// transaction, and the tasks' handle reaches it through a runConn
		// all the same, which keeps it theirs only while the run lasts.
		gtx := p.session(ctx).Begin()
		if gtx.Error != nil {
			return nil, 0, gtx.Error
		}
		t.rc = &runConn{gtx: gtx, ConnPool: gtx.Statement.ConnPool}
		t.db = p.session(ctx)
		t.db.Statement.ConnPool = t.rc
	} else {
		t.rc = &runConn{sqlDB: p.sqlDB}
		if txns := p.dialect.txns; txns != nil {
			conn, n, err := txns.begin(ctx, p.sqlDB, first, args)
			if err != nil {
				return nil, 0, err
			}
			return p.connTxn(ctx, conn), n, nil
		}
		tx, err := p.sqlDB.BeginTx(ctx, nil)
		if err != nil {
			return nil, 0, err
		}
		t.rc.tx, t.rc.ConnPool = tx, tx
		t.db = p.session(ctx)
		t.db.Statement.ConnPool = t.rc
	}
	if first == "" {
		return t, 0, nil
	}
	n, err := p.execHot(t.db, first, args...)
	if err != nil {
		t.rollback()
		return nil, 0, err
	}
	return t, n, nil
}

// connTxn is a run's transaction open on conn (connTxns).
func (p *Plugin) connTxn(ctx context.Context, conn *sql.Conn) *runTxn {
	t := &runTxn{p: p, ctx: ctx, rc: &runConn{sqlDB: p.sqlDB, conn: conn, ConnPool: conn}}
	t.db = p.session(ctx)
	t.db.Statement.ConnPool = t.rc
	return t
}

// exec runs a hot-path statement in the run's transaction.
func (t *runTxn) exec(q string, args ...any) (int64, error) {
	return t.p.execHot(t.db, q, args...)
}

// commitAfter runs q (unless it is "") and commits: on a connTxns
// connection both in one round trip. execErr is q's error (the transaction
// then still needs rollback); commitErr is the commit's.
func (t *runTxn) commitAfter(q string, args ...any) (execErr, commitErr error) {
	if t.rc.conn != nil {
		execErr, commitErr, _, _ = t.p.dialect.txns.commit(t.ctx, t.rc.conn, q, args, "", nil)
		if execErr == nil && commitErr == nil {
			t.end()
			_ = t.rc.conn.Close()
		}
	} else {
		if q != "" {
			if _, execErr = t.exec(q, args...); execErr != nil {
				return execErr, nil
			}
		}
		if t.rc.gtx != nil {
			commitErr = t.rc.gtx.Commit().Error
		} else {
			commitErr = t.rc.tx.Commit()
		}
		if commitErr == nil {
			t.end()
		}
	}
	if t.ended && t.rc.hasJobs.Load() {
		t.p.wakers.broadcast()
	}
	return execErr, commitErr
}

// onConn reports whether the run's transaction is held on a connection by
// connTxns (Postgres with pgx, MariaDB), where commitThenBegin applies.
func (t *runTxn) onConn() bool { return t.rc.conn != nil }

// commitThenBegin runs q and commits, then begins the next run's
// transaction on the same connection and runs next in it (one round trip
// for all four). execErr and commitErr are as for commitAfter; nt is the
// next run's transaction, nil if it could not be begun (the caller then
// begins one afresh), with the rows next affected or returned.
func (t *runTxn) commitThenBegin(q string, args []any, next string, nextArgs []any) (execErr, commitErr error, nt *runTxn, nextN int64) {
	conn, txns := t.rc.conn, t.p.dialect.txns
	execErr, commitErr, nextN, beginErr := txns.commit(t.ctx, conn, q, args, next, nextArgs)
	if execErr != nil || commitErr != nil {
		return execErr, commitErr, nil, 0 // the caller rolls back what is open
	}
	t.end()
	if t.rc.hasJobs.Load() {
		t.p.wakers.broadcast()
	}
	if beginErr != nil {
		txns.rollback(t.ctx, conn)
		return nil, nil, nil, 0
	}
	return nil, nil, t.p.connTxn(t.ctx, conn), nextN
}

// startTask returns the context of a task about to run in the run's
// transaction, the task's handle on it, and the function that ends the
// context when the task returns: database/sql then closes a result set the
// task left open, which on a connection holding the run's transaction (pgx,
// MariaDB) would otherwise keep the run's next statement from running and
// the connection from being closed, and the worker slot waiting for it. An
// error a task left on the handle (AddError) is cleared for the next.
//
// One handle serves all the run's tasks, its context switching to the
// running task's (taskContext): a *gorm.DB per task would cost a clone of
// its statement each, which showed in group commit's CPU per job.
func (t *runTxn) startTask(ctx context.Context) (context.Context, *gorm.DB, context.CancelFunc) {
	if t.taskDB == nil {
		t.tasks, t.stopTasks = context.WithCancel(ctx)
		t.taskCtx = &taskContext{Context: t.tasks}
		t.taskDB = t.db.WithContext(t.taskCtx)
	}
	t.taskDB.Error = nil
	c, cancel := context.WithCancel(t.tasks)
	t.taskCtx.cur.Store(&c)
	return c, t.taskDB, cancel
}

// taskContext is a run's tasks' handle's context: the last task's own
// context (startTask), or before any task the run's.
type taskContext struct {
	context.Context
	cur atomic.Pointer[context.Context]
}

func (c *taskContext) current() context.Context {
	if p := c.cur.Load(); p != nil {
		return *p
	}
	return c.Context
}

// Deadline is the running task's.
func (c *taskContext) Deadline() (time.Time, bool) { return c.current().Deadline() }

// Done is the running task's.
func (c *taskContext) Done() <-chan struct{} { return c.current().Done() }

// Err is the running task's.
func (c *taskContext) Err() error { return c.current().Err() }

// Value is the running task's.
func (c *taskContext) Value(key any) any { return c.current().Value(key) }

// end marks the run's transaction ended, for the library and for its
// tasks' handles, and ends its tasks' context.
func (t *runTxn) end() {
	t.ended = true
	t.rc.ended.Store(true)
	if t.stopTasks != nil {
		t.stopTasks()
	}
}

// commit commits the run's transaction.
func (t *runTxn) commit() error {
	execErr, commitErr := t.commitAfter("")
	if execErr != nil {
		return execErr
	}
	return commitErr
}

// rollback ends the run's transaction, undoing it; it does nothing once the
// transaction has ended.
func (t *runTxn) rollback() {
	if t.ended {
		return
	}
	t.end()
	switch {
	case t.rc.gtx != nil:
		t.rc.gtx.Rollback()
	case t.rc.conn != nil:
		t.p.dialect.txns.rollback(detach(t.ctx), t.rc.conn)
	default:
		_ = t.rc.tx.Rollback()
	}
}
