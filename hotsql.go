package async

import (
	"context"
	"database/sql"
	"strings"
	"sync"
	"time"

	"gorm.io/gorm"
)

// Hot-path statements (claims, the run's fence and completion) are fixed
// SQL texts with plain scalar arguments. They skip GORM's statement builder
// and, where the driver would otherwise prepare them on every call (MySQL's
// driver prepares, executes and closes each statement with arguments), they
// run as statements prepared once per pooled connection. pgx caches
// prepared statements itself.

// maxHotStmts bounds the prepared statements the plugin keeps, so that texts
// that vary (a claim's id list) cannot pile up on the server.
const maxHotStmts = 64

type stmtCache struct {
	mu        sync.Mutex
	stmts     map[string]*sql.Stmt
	preparing map[string]bool
}

// prepareWait bounds how long preparing a statement may wait for a pooled
// connection.
const prepareWait = 100 * time.Millisecond

// prepared returns q prepared on the pool, or nil when it should run
// unprepared this time. Preparing takes a connection of its own (database/sql
// prepares on the pool, then again on each connection at first use), and
// the caller may already hold one inside a transaction: so it never waits
// on a busy pool, which could deadlock a worker whose pool is just large
// enough, and callers meanwhile run the statement unprepared.
func (p *Plugin) prepared(ctx context.Context, q string) *sql.Stmt {
	if !p.dialect.prepareHot() || p.sqlDB == nil {
		return nil
	}
	c := &p.stmts
	c.mu.Lock()
	if s, ok := c.stmts[q]; ok {
		c.mu.Unlock()
		return s
	}
	if len(c.stmts) >= maxHotStmts || c.preparing[q] || poolFull(p.sqlDB) {
		c.mu.Unlock()
		return nil
	}
	if c.preparing == nil {
		c.preparing, c.stmts = map[string]bool{}, map[string]*sql.Stmt{}
	}
	c.preparing[q] = true
	c.mu.Unlock()

	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), prepareWait)
	s, err := p.sqlDB.PrepareContext(pctx, q)
	cancel()
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.preparing, q)
	if err != nil {
		return nil // run it unprepared; the error, if real, shows there
	}
	c.stmts[q] = s
	return s
}

// poolFull reports whether taking a connection from db would wait.
func poolFull(db *sql.DB) bool {
	s := db.Stats()
	return s.MaxOpenConnections > 0 && s.InUse >= s.MaxOpenConnections
}

// sqlTxOf is the *sql.Tx under a GORM transaction handle, if there is one.
func sqlTxOf(db *gorm.DB) *sql.Tx {
	switch c := db.Statement.ConnPool.(type) {
	case *sql.Tx:
		return c
	case *wakeTx:
		return c.Tx
	case *runConn:
		return c.tx
	}
	return nil
}

// sqlRunner is what *sql.Tx and *sql.DB share.
type sqlRunner interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// hotTarget picks where a hot-path statement runs without GORM's statement
// building: q prepared on db's transaction or pool (stmt), or else db's
// *sql.Tx or pool, given q's text (on). Both are nil where GORM must run it:
// where the driver's placeholders are not ?, and for a connection pool the
// plugin does not know.
func (p *Plugin) hotTarget(db *gorm.DB, q string) (stmt *sql.Stmt, on sqlRunner) {
	if !p.dialect.questionMarks() {
		return nil, nil
	}
	if rc, ok := db.Statement.ConnPool.(*runConn); ok && rc.conn != nil {
		return nil, p.dialect.txns.runner(rc.conn) // a run's transaction held by connTxns
	}
	tx := sqlTxOf(db)
	switch {
	case tx != nil:
		on = tx
	case p.sqlDB != nil && isPool(db):
		on = p.sqlDB
	default:
		return nil, nil
	}
	ctx := db.Statement.Context
	if s := p.prepared(ctx, q); s != nil {
		if tx != nil {
			return tx.StmtContext(ctx, s), nil
		}
		return s, nil
	}
	return nil, on
}

// execHot runs a hot-path statement with ? placeholders on db (a session or
// a transaction handle) and returns the rows it affected, or for a SELECT
// the rows it returned.
func (p *Plugin) execHot(db *gorm.DB, q string, args ...any) (int64, error) {
	if strings.HasPrefix(q, "SELECT ") {
		return p.countHot(db, q, args...)
	}
	ctx := db.Statement.Context
	var res sql.Result
	var err error
	switch s, on := p.hotTarget(db, q); {
	case s != nil:
		res, err = s.ExecContext(ctx, args...)
	case on != nil:
		res, err = on.ExecContext(ctx, q, args...)
	default:
		g := db.Exec(q, args...)
		return g.RowsAffected, g.Error
	}
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// queryHot runs a hot-path query with ? placeholders on db.
func (p *Plugin) queryHot(db *gorm.DB, q string, args ...any) (*sql.Rows, error) {
	switch s, on := p.hotTarget(db, q); {
	case s != nil:
		return s.QueryContext(db.Statement.Context, args...)
	case on != nil:
		return on.QueryContext(db.Statement.Context, q, args...)
	}
	// Rows, not Scan: GORM's Scan renders the statement with its arguments
	// for a trace on every call, a regexp pass that showed in profiles.
	return db.Raw(q, args...).Rows()
}

// countHot runs a hot-path query and counts the rows it returns.
func (p *Plugin) countHot(db *gorm.DB, q string, args ...any) (int64, error) {
	return countRows(p.queryHot(db, q, args...))
}

// hotQuery runs hot-path queries with ? placeholders somewhere: on a
// *gorm.DB (hotQueryOn), or on a claim's connection (claimWalkBlocks).
type hotQuery func(q string, args ...any) (*sql.Rows, error)

// hotQueryOn runs hot-path queries on db.
func (p *Plugin) hotQueryOn(db *gorm.DB) hotQuery {
	return func(q string, args ...any) (*sql.Rows, error) { return p.queryHot(db, q, args...) }
}

// queryJobs runs a hot-path query returning rows of jobColumnList.
func (p *Plugin) queryJobs(db *gorm.DB, q string, args ...any) ([]*Job, error) {
	return scanJobs(p.queryHot(db, q, args...))
}

// scanJobs reads rows of jobColumnList and closes them.
func scanJobs(rows *sql.Rows, err error) ([]*Job, error) {
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var jobs []*Job
	for rows.Next() {
		j, err := scanJob(rows)
		if err != nil {
			return nil, err
		}
		jobs = append(jobs, j)
	}
	return jobs, rows.Err()
}

// isPool reports whether db runs statements on the connection pool itself
// (not inside a transaction).
func isPool(db *gorm.DB) bool {
	switch db.Statement.ConnPool.(type) {
	case *wakePool, *sql.DB:
		return true
	}
	return false
}
