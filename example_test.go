package async_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/libtnb/sqlite"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Greeting is written by the example's task.
type Greeting struct {
	ID   int64 `gorm:"primaryKey"`
	Text string
}

// Greet is a task: its writes through tx commit with the job's completion.
func Greet(ctx context.Context, tx *gorm.DB, name string) error {
	return tx.Create(&Greeting{Text: "hello, " + name}).Error
}

// This mirrors the README's quick start.
func Example() {
	dir, _ := os.MkdirTemp("", "async-example")
	defer os.RemoveAll(dir)
	dsn := filepath.Join(dir, "app.db") + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)"

	db, err := gorm.Open(sqlite.Open(dsn), &gorm.Config{})
	if err != nil {
		log.Fatal(err)
	}
	if err := db.Use(&async.Plugin{}); err != nil { // installs async_job, async_error, ...
		log.Fatal(err)
	}
	if err := db.AutoMigrate(&Greeting{}); err != nil {
		log.Fatal(err)
	}
	async.MustRegister(Greet)

	// The job is part of the transaction: it exists only if this commits.
	err = db.Transaction(func(tx *gorm.DB) error {
		_, err := async.Schedule(tx, Greet, async.Args("world"))
		return err
	})
	if err != nil {
		log.Fatal(err)
	}

	// Run the due jobs once (a long-running async.NewWorker does the same).
	n, err := async.FlushQueue(db, async.FlushOptions{})
	if err != nil {
		log.Fatal(err)
	}
	var g Greeting
	db.First(&g)
	fmt.Println(n, "job ran:", g.Text)
	// Output: 1 job ran: hello, world
}
