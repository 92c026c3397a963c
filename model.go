package async

import (
	"bytes"
	"crypto/sha1"
	"encoding/hex"
	"encoding/json"
	"sort"
	"strings"
	"time"

	"gorm.io/gorm"
)

// Table names. They follow the reference system's tables.
const (
	jobTable   = "async_job"
	errorTable = "async_error"
	groupTable = "async_group"
	lockTable  = "async_lock"
)

// Job is a scheduled call of a registered task: the GORM model of table
// async_job. A job is pending while Executed, Cancelled and Failed are all nil.
type Job struct {
	// ID is the job's id, assigned when it is inserted.
	ID int64 `gorm:"column:id;primaryKey;autoIncrement" json:"id"`
	// Name is the registered task name.
	Name string `gorm:"column:name;size:191;not null" json:"name"`
	// Queue is the queue the job is served from ("default" unless set).
	Queue string `gorm:"column:queue;size:100;not null" json:"queue"`
	// Args is the JSON array of positional arguments.
	Args string `gorm:"column:args;type:text;not null" json:"args"`
	// Kwargs is the JSON object of keyword arguments.
	Kwargs string `gorm:"column:kwargs;type:text;not null" json:"kwargs"`
	// Meta is free JSON for the application; the library stores it only.
	Meta string `gorm:"column:meta;type:text;not null" json:"meta"`
	// Result is the JSON encoding of the task's result once executed.
	Result string `gorm:"column:result;type:text" json:"result"`
	// Priority orders runnable jobs: higher runs first. Default 5.
	Priority int `gorm:"column:priority;not null" json:"priority"`
	// Identity is the SHA-1 of the job's text form (name and arguments).
	Identity string `gorm:"column:identity;size:40;not null" json:"identity"`
	// Added is when the job was scheduled.
	Added time.Time `gorm:"column:added;precision:6;not null" json:"added"`
	// Scheduled is the earliest time the job may run; nil means as soon as possible.
	Scheduled *time.Time `gorm:"column:scheduled;precision:6" json:"scheduled"`
	// Started is when the successful run started (committed with Executed).
	Started *time.Time `gorm:"column:started;precision:6" json:"started"`
	// Executed is when the job completed successfully.
	Executed *time.Time `gorm:"column:executed;precision:6" json:"executed"`
	// Cancelled is when the job was descheduled.
	Cancelled *time.Time `gorm:"column:cancelled;precision:6" json:"cancelled"`
	// Failed is when the job ended in the terminal failed state.
	Failed *time.Time `gorm:"column:failed;precision:6" json:"failed"`
	// Attempts counts the runs started, including the one in progress.
	Attempts int `gorm:"column:attempts;not null" json:"attempts"`
	// MaxAttempts is how many runs the job gets; zero or less means unlimited.
	MaxAttempts int `gorm:"column:max_attempts;not null" json:"max_attempts"`
	// LockedUntil is the lease of the worker that claimed the job.
	LockedUntil *time.Time `gorm:"column:locked_until;precision:6" json:"locked_until"`
	// LockedBy identifies the claim that holds the lease ("" when free).
	LockedBy string `gorm:"column:locked_by;size:64;not null" json:"locked_by"`
	// GroupID is the job's group, if any.
	GroupID *int64 `gorm:"column:group_id" json:"group_id"`
}

// TableName returns "async_job".
func (Job) TableName() string { return jobTable }

// Pending reports whether the job may still run.
func (j *Job) Pending() bool { return j.Executed == nil && j.Cancelled == nil && j.Failed == nil }

// AfterFind presents the job's times in UTC, whatever zone the driver used.
func (j *Job) AfterFind(*gorm.DB) error { j.normalize(); return nil }

func (j *Job) normalize() {
	j.Added = j.Added.UTC()
	for _, t := range []*time.Time{j.Scheduled, j.Started, j.Executed, j.Cancelled, j.Failed, j.LockedUntil} {
		if t != nil {
			*t = t.UTC()
		}
	}
}

// String returns the job's human-readable text form, name(args, key=value).
func (j *Job) String() string { return textForm(j.Name, j.Args, j.Kwargs) }

// JobError is one recorded failure of a job: the GORM model of table async_error.
type JobError struct {
	// ID is the error row's id.
	ID int64 `gorm:"column:id;primaryKey;autoIncrement" json:"id"`
	// JobID is the job that failed.
	JobID int64 `gorm:"column:job_id;not null;index:async_error_job" json:"job_id"`
	// Executed is when the failure was recorded (the reference's column name).
	Executed time.Time `gorm:"column:executed;precision:6;not null" json:"executed"`
	// Exception is the error text, prefixed by its Go type.
	Exception string `gorm:"column:exception;type:text;not null" json:"exception"`
	// Traceback is the goroutine stack and the chain of wrapped errors.
	Traceback string `gorm:"column:traceback;type:text;not null" json:"traceback"`
}

// AfterFind presents the error's time in UTC.
func (e *JobError) AfterFind(*gorm.DB) error { e.Executed = e.Executed.UTC(); return nil }

// TableName returns "async_error".
func (JobError) TableName() string { return errorTable }

// Group collects jobs under a reference; its Final job runs after all others.
type Group struct {
	// ID is the group's id (Job.GroupID).
	ID int64 `gorm:"column:id;primaryKey;autoIncrement" json:"id"`
	// Reference is the name InGroup and OnCompletion find the group by;
	// its generations share it.
	Reference string `gorm:"column:reference;size:191;not null;index:async_group_reference;uniqueIndex:async_group_generation,priority:1" json:"reference"`
	// Description is free text for the application.
	Description *string `gorm:"column:description;type:text" json:"description"`
	// Created is when the group was created.
	Created time.Time `gorm:"column:created;precision:6;not null" json:"created"`
	// FinalID is the job that runs once all the group's others are done
	// (OnCompletion), if any.
	FinalID *int64 `gorm:"column:final_id;index:async_group_final" json:"final_id"`
	// Generation numbers the groups the library creates under a reference
	// (1, 2, ...), unique per reference, so that two transactions that
	// start the same generation at once end up in one group. Groups an
	// application creates itself may leave it nil.
	Generation *int64 `gorm:"column:generation;uniqueIndex:async_group_generation,priority:2" json:"generation"`
}

// AfterFind presents the group's time in UTC.
func (g *Group) AfterFind(*gorm.DB) error { g.Created = g.Created.UTC(); return nil }

// TableName returns "async_group".
func (Group) TableName() string { return groupTable }

// partitionLock is a row of async_lock: a named lease held by one process.
type partitionLock struct {
	Name    string    `gorm:"column:name;primaryKey;size:191"`
	Owner   string    `gorm:"column:owner;size:64;not null"`
	Expires time.Time `gorm:"column:expires;precision:6;not null"`
}

func (partitionLock) TableName() string { return lockTable }

// textForm renders name(arg1, arg2, key=value) from the stored JSON. Each value
// is written in canonical JSON; keyword arguments are sorted by key.
func textForm(name, args, kwargs string) string {
	var b strings.Builder
	b.WriteString(name)
	b.WriteByte('(')
	first := true
	sep := func() {
		if !first {
			b.WriteString(", ")
		}
		first = false
	}
	var list []json.RawMessage
	if json.Unmarshal([]byte(args), &list) == nil {
		for _, a := range list {
			sep()
			b.Write(canonicalJSON(a))
		}
	}
	var kw map[string]json.RawMessage
	if json.Unmarshal([]byte(kwargs), &kw) == nil {
		keys := make([]string, 0, len(kw))
		for k := range kw {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			sep()
			b.WriteString(k)
			b.WriteByte('=')
			b.Write(canonicalJSON(kw[k]))
		}
	}
	b.WriteByte(')')
	return b.String()
}

// canonicalJSON re-encodes a JSON value compactly with object keys sorted and
// numbers kept as written, so equal values give equal bytes.
func canonicalJSON(raw []byte) []byte {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if dec.Decode(&v) != nil {
		return raw
	}
	out, err := json.Marshal(v)
	if err != nil {
		return raw
	}
	return out
}

// identityOf is the SHA-1 hex of the text form: the key Deschedule matches on.
func identityOf(name, args, kwargs string) string {
	sum := sha1.Sum([]byte(textForm(name, args, kwargs)))
	return hex.EncodeToString(sum[:])
}

// jobColumnList lists async_job's columns in the order scanJob reads them.
// The library's own reads of job rows name them (never *), so that a table
// whose columns were added in another order by a migration reads the same.
const jobColumnList = "id, name, queue, args, kwargs, meta, result, priority, identity, added, scheduled, started, executed, cancelled, failed, attempts, max_attempts, locked_until, locked_by, group_id"

// jobColumnsOf is jobColumnList with each column qualified by alias.
func jobColumnsOf(alias string) string {
	return alias + "." + strings.ReplaceAll(jobColumnList, ", ", ", "+alias+".")
}

// jobColumnList qualified for the claim's alias j and for the table name
// (an UPDATE ... FROM returning the table's columns).
var jobColumnsJ, jobColumnsTable = jobColumnsOf("j"), jobColumnsOf(jobTable)

// rowScanner is a row source: pgx.Rows or *sql.Rows.
type rowScanner interface{ Scan(dest ...any) error }

// scanJob reads a row of jobColumnList.
func scanJob(rows rowScanner) (*Job, error) {
	j := new(Job)
	var result *string
	err := rows.Scan(&j.ID, &j.Name, &j.Queue, &j.Args, &j.Kwargs, &j.Meta, &result, &j.Priority, &j.Identity, &j.Added,
		&j.Scheduled, &j.Started, &j.Executed, &j.Cancelled, &j.Failed, &j.Attempts, &j.MaxAttempts, &j.LockedUntil,
		&j.LockedBy, &j.GroupID)
	if result != nil {
		j.Result = *result
	}
	return j, err
}
