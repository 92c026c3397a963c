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

// installCommitWake wraps db's pool. Pools other than a plain *sql.DB (for
// example GORM's prepared-statement mode) are left as they are: workers then
// rely on NOTIFY and polling.
func installCommitWake(db *gorm.DB, p *Plugin) *sql.DB {
	sqlDB, ok := db.ConnPool.(*sql.DB)
	if !ok {
		return nil
	}
	wp := &wakePool{DB: sqlDB, p: p}
	db.ConnPool = wp
	if db.Statement != nil && db.Statement.ConnPool == sqlDB {
		db.Statement.ConnPool = wp
	}
	return sqlDB
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
	switch c := db.Statement.ConnPool.(type) {
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
		err := p.dialect.listen(ctx, sqlDB, retry.reset, p.wakers.broadcast)
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
