// Command worker is a small application that runs async jobs: it registers
// two tasks, schedules a few jobs together with its own writes, and runs a
// worker until SIGINT or SIGTERM, then lets running jobs finish.
//
//	go run ./examples/worker                      # SQLite file worker.db
//	go run ./examples/worker -dsn 'postgres://user@localhost:5432/app?sslmode=disable'
//	ASYNC_DSN='user@tcp(localhost:3306)/app?parseTime=true' go run ./examples/worker
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/libtnb/sqlite"
	"gorm.io/driver/mysql"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/gormasync/async"
)

const defaultDSN = "worker.db?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)"

// Signup is the application's own data; a welcome mail is sent for each.
type Signup struct {
	ID      int64 `gorm:"primaryKey"`
	Email   string
	Welcome *time.Time
}

// sendWelcome "sends" the welcome mail of a signup. It runs in the job's
// transaction: the update commits with the job's completion, or not at all.
func sendWelcome(ctx context.Context, tx *gorm.DB, signupID int64) error {
	var s Signup
	if err := tx.First(&s, signupID).Error; err != nil {
		return async.Permanent(fmt.Errorf("signup %d: %w", signupID, err)) // retrying will not help
	}
	slog.Info("sending welcome mail", "to", s.Email)
	now := time.Now()
	return tx.Model(&s).Update("welcome", &now).Error
}

// add returns a result, stored as JSON in the job's result column.
func add(ctx context.Context, tx *gorm.DB, a, b int) (int, error) {
	return a + b, nil
}

func init() {
	async.MustRegister(sendWelcome)
	async.MustRegister(add)
}

// open picks the driver from the DSN: postgres:// or postgresql:// URLs,
// MySQL/MariaDB DSNs (user:pass@tcp(host:port)/db?parseTime=true, optionally
// written mysql://...), and anything else is an SQLite file.
func open(dsn string) (*gorm.DB, error) {
	var dial gorm.Dialector
	switch {
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"):
		dial = postgres.Open(dsn)
	case strings.HasPrefix(dsn, "mysql://"):
		dial = mysql.Open(strings.TrimPrefix(dsn, "mysql://"))
	case strings.Contains(dsn, "@tcp("), strings.Contains(dsn, "@unix("):
		dial = mysql.Open(dsn)
	default:
		dial = sqlite.Open(dsn)
	}
	db, err := gorm.Open(dial, &gorm.Config{Logger: logger.Default.LogMode(logger.Warn)})
	if err != nil {
		return nil, err
	}
	if err := db.Use(&async.Plugin{}); err != nil {
		return nil, err
	}
	return db, db.AutoMigrate(&Signup{})
}

func main() {
	dsnDefault := defaultDSN
	if env := os.Getenv("ASYNC_DSN"); env != "" {
		dsnDefault = env
	}
	dsn := flag.String("dsn", dsnDefault, "database: an SQLite file, a postgres:// URL or a MySQL DSN (also ASYNC_DSN)")
	concurrency := flag.Int("concurrency", 4, "jobs run at once")
	flag.Parse()
	if err := run(*dsn, *concurrency); err != nil {
		slog.Error("worker", "error", err)
		os.Exit(1)
	}
}

func run(dsn string, concurrency int) error {
	db, err := open(dsn)
	if err != nil {
		return err
	}
	if sqlDB, err := db.DB(); err == nil {
		defer sqlDB.Close()
	}

	// Jobs scheduled in a transaction exist only if it commits.
	err = db.Transaction(func(tx *gorm.DB) error {
		for _, email := range []string{"ada@example.com", "grace@example.com"} {
			s := Signup{Email: email}
			if err := tx.Create(&s).Error; err != nil {
				return err
			}
			if _, err := async.Schedule(tx, sendWelcome, async.Args(s.ID)); err != nil {
				return err
			}
		}
		_, err := async.Schedule(tx, add, async.Args(2, 3), async.Priority(9))
		if err != nil {
			return err
		}
		_, err = async.Schedule(tx, add, async.Args(40, 2), async.RunAfter(time.Now().Add(5*time.Second)))
		return err
	})
	if err != nil {
		return fmt.Errorf("scheduling: %w", err)
	}

	w, err := async.NewWorker(db, async.WorkerOptions{Concurrency: concurrency, ShutdownTimeout: 10 * time.Second})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	o := w.Options()
	slog.Info("worker running; Ctrl-C to stop", "id", o.ID, "concurrency", o.Concurrency, "queues", o.Queues)
	// Run returns after ctx is cancelled and running jobs have finished (or
	// were cancelled after ShutdownTimeout, rolled back and left runnable).
	if err := w.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	h, err := async.Health(db)
	if err != nil {
		return err
	}
	slog.Info("stopped", "executed", h.Queue.Executed, "remaining", h.Queue.Remaining, "failed", h.Queue.Failed)
	return nil
}
