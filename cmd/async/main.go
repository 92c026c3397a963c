// Command async is the queue's operator tool for any database the plugin
// runs on:
//
//	async -dsn DSN queue_health [--algorithm rough|precise]
//	async -dsn DSN retry JOB_ID
//	async -dsn DSN flush_queue [--jobs N] ...
//
// It knows only the built-in tasks (async.RemoveOldJobs): to flush an
// application's queue, call async.RunCommand from the application's own main
// after registering its tasks.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/gormasync/async"
	"github.com/gormasync/async/internal/dbopen"
)

func main() {
	dsn := flag.String("dsn", os.Getenv("ASYNC_DSN"), "database DSN: postgres://..., user@tcp(host)/db?parseTime=true, or a SQLite file")
	migrate := flag.Bool("migrate", false, "create or update the queue's tables")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: async -dsn DSN [-migrate] flush_queue|queue_health|retry [options]")
		flag.PrintDefaults()
	}
	flag.Parse()
	if *dsn == "" {
		flag.Usage()
		os.Exit(2)
	}
	db, err := dbopen.Open(*dsn)
	if err == nil {
		err = db.Use(&async.Plugin{SkipMigration: !*migrate})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := async.RunCommand(ctx, db, flag.Args(), os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
