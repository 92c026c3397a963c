// Command quickstart shows the async job queue end to end on an embedded
// SQLite file (no server needed):
//
//	go run ./examples/quickstart
//	go run ./examples/quickstart -dsn 'postgres://postgres@127.0.0.1:5432/test?sslmode=disable'
//
// A model's AfterCreate hook schedules a job in the model's transaction: one
// transaction commits (its job runs), another rolls back (its job never
// existed). flush_queue then runs the queue and the health report is printed.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"

	"gorm.io/gorm"

	"github.com/gormasync/async"
	"github.com/gormasync/async/internal/dbopen"
)

// Order is an application model. Creating one schedules its confirmation.
type Order struct {
	ID    int64 `gorm:"primaryKey"`
	Email string
}

// AfterCreate schedules the confirmation in the order's own transaction.
func (o *Order) AfterCreate(tx *gorm.DB) error {
	_, err := async.Schedule(tx, SendConfirmation, async.Args(o.ID, o.Email))
	return err
}

// Outbox records the mails the task "sent": the task's database writes
// commit together with the job's completion.
type Outbox struct {
	ID      int64 `gorm:"primaryKey"`
	OrderID int64
	Body    string
}

// SendConfirmation is the task: a plain Go function of (ctx, tx, args...).
func SendConfirmation(ctx context.Context, tx *gorm.DB, orderID int64, email string) (string, error) {
	body := fmt.Sprintf("Order %d confirmed; mail to %s", orderID, email)
	return body, tx.Create(&Outbox{OrderID: orderID, Body: body}).Error
}

func main() {
	dsn := flag.String("dsn", os.Getenv("ASYNC_DSN"), "database DSN (default: the SQLite file quickstart.db)")
	flag.Parse()
	if *dsn == "" {
		*dsn = "quickstart.db"
		for _, f := range []string{"quickstart.db", "quickstart.db-wal", "quickstart.db-shm"} {
			_ = os.Remove(f) // start afresh each run
		}
	}
	db, err := dbopen.Open(*dsn)
	check(err)
	check(db.Use(&async.Plugin{}))
	check(db.AutoMigrate(&Order{}, &Outbox{}))
	async.MustRegister(SendConfirmation)

	// Committed: the order and its job are both there.
	check(db.Transaction(func(tx *gorm.DB) error {
		return tx.Create(&Order{Email: "ada@example.com"}).Error
	}))
	// Rolled back: neither the order nor its job ever existed.
	err = db.Transaction(func(tx *gorm.DB) error {
		if err := tx.Create(&Order{Email: "bob@example.com"}).Error; err != nil {
			return err
		}
		return errors.New("payment declined")
	})
	fmt.Println("second order rolled back:", err)

	// flush_queue: run the due jobs, each in its own transaction.
	n, err := async.FlushQueue(db, async.FlushOptions{Out: os.Stdout})
	check(err)
	fmt.Printf("ran %d job(s)\n", n)

	var mails []Outbox
	check(db.Find(&mails).Error)
	for _, m := range mails {
		fmt.Println("outbox:", m.Body)
	}
	health, err := async.Health(db)
	check(err)
	out, _ := json.MarshalIndent(health, "", "  ")
	fmt.Println(string(out))
}

func check(err error) {
	if err != nil {
		log.Fatal(err)
	}
}
