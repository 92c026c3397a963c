package async

import (
	"context"
	"database/sql"
	"sync/atomic"
	"time"

	"gorm.io/gorm"
)

// Wake-ups. In this process, at commit: the plugin wraps the *sql.DB
// connection pool so that transactions begun through GORM can run code after
// COMMIT: when a transaction inserted jobs, its commit wakes this process's
// idle workers. Other processes learn of new jobs by polling, or on Postgres
// by NOTIFY, which a worker's listener (listen, below) turns into a wake-up.

type wakePool struct {
	*sql.DB
	p *Plugin
}

// installCommitWake wraps db's pool, a plain *sql.DB or the one under GORM's
// prepared-statement mode, and returns it. Other pools (a resolver's, say)
// are left as they are, and it returns nil: transactions committed through
// them wake no worker of this process, which then relies on NOTIFY and
// polling.
func installCommitWake(db *gorm.DB, p *Plugin) *sql.DB {
	switch pool := db.ConnPool.(type) {
	case *sql.DB:
		wp := &wakePool{DB: pool, p: p}
		db.ConnPool = wp
		if db.Statement != nil && db.Statement.ConnPool == pool {
			db.Statement.ConnPool = wp
		}
		return pool
	case *gorm.PreparedStmtDB:
		// Its statements still run through it; its transactions begin on
		// the pool it wraps, and come back wrapped (PreparedStmtTX).
		if sqlDB, ok := pool.ConnPool.(*sql.DB); ok {
			pool.ConnPool = &wakePool{DB: sqlDB, p: p}
			return sqlDB
		}
	}
	return nil
}

// GetDBConn lets gorm.DB.DB() find the *sql.DB.
func (w *wakePool) GetDBConn() (*sql.DB, error) { return w.DB, nil }

// BeginTx begins a transaction whose commit can wake workers.
func (w *wakePool) BeginTx(ctx context.Context, opts *sql.TxOptions) (gorm.ConnPool, error) {
	tx, err := w.DB.BeginTx(ctx, opts)
	if err != nil {
		return nil, err
	}
	return &wakeTx{Tx: tx, db: w.DB, p: w.p}, nil
}

type wakeTx struct {
	*sql.Tx
	db      *sql.DB
	p       *Plugin
	hasJobs atomic.Bool
}

// GetDBConn lets gorm.DB.DB() find the *sql.DB of a transaction handle.
func (t *wakeTx) GetDBConn() (*sql.DB, error) { return t.db, nil }

// Commit commits and, when the transaction inserted jobs, wakes workers.
func (t *wakeTx) Commit() error {
	err := t.Tx.Commit()
	if err == nil && t.hasJobs.Load() {
		t.p.wakers.broadcast()
	}
	return err
}

// afterCreate is the async:wake_on_job_insert callback.
func (p *Plugin) afterCreate(db *gorm.DB) {
	if db.Error != nil || db.Statement.RowsAffected == 0 || db.Statement.Schema == nil || db.Statement.Schema.Table != jobTable {
		return
	}
	p.jobsInserted(db)
}

// jobsInserted marks the transaction of db's pool as having inserted jobs,
// so that its commit wakes this process's idle workers, or wakes them at
// once when the insert committed already (autocommit).
func (p *Plugin) jobsInserted(db *gorm.DB) {
	pool := db.Statement.ConnPool
	if ps, ok := pool.(*gorm.PreparedStmtTX); ok {
		pool = ps.Tx // GORM's prepared-statement mode
	}
	switch c := pool.(type) {
	case *wakeTx:
		c.hasJobs.Store(true)
	case *runConn:
		c.hasJobs.Store(true) // a task scheduled jobs: wake at the run's commit
	case gorm.TxCommitter:
		// A transaction the plugin cannot observe: rely on NOTIFY or polling.
	default:
		p.wakers.broadcast() // autocommit: the job is already visible
	}
}

// listen keeps a LISTEN connection open (Postgres), reconnecting with backoff.
func (w *Worker) listen(ctx context.Context) {
	p := w.p
	sqlDB, err := p.db.DB()
	if err != nil {
		return
	}
	retry := newBackoff()
	for ctx.Err() == nil {
		// Once listening, a claim: a job committed while no LISTEN was in
		// place (at start, or while reconnecting) sent its NOTIFY to no one.
		ready := func() { retry.reset(); p.wakers.broadcast() }
		err := p.dialect.listen(ctx, sqlDB, ready, p.wakers.broadcast)
		if ctx.Err() != nil {
			return
		}
		d := retry.next()
		p.Logger.Warn("async: notification listener lost; polling until it reconnects", "error", err, "in", d)
		select {
		case <-ctx.Done():
			return
		case <-time.After(d):
		}
	}
}
