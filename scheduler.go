package async

import (
	"encoding/json"
	"fmt"
	"time"

	"gorm.io/gorm"
)

// Option configures a job at Schedule time.
type Option func(*jobSpec)

type jobSpec struct {
	args        []any
	kwargs      Kwargs
	runAfter    *time.Time
	priority    int
	meta        map[string]any
	queue       string
	maxAttempts *int
	group       string
	err         error
}

// Args sets the task's positional arguments. Each must encode to JSON that
// decodes into the corresponding parameter.
func Args(v ...any) Option { return func(s *jobSpec) { s.args = append(s.args, v...) } }

// WithKwargs sets keyword arguments, passed to a task whose last parameter is Kwargs.
func WithKwargs(k Kwargs) Option {
	return func(s *jobSpec) {
		if s.kwargs == nil {
			s.kwargs = Kwargs{}
		}
		for key, v := range k {
			s.kwargs[key] = v
		}
	}
}

// RunAfter sets the earliest time the job may run.
func RunAfter(t time.Time) Option {
	return func(s *jobSpec) { u := t.UTC().Truncate(time.Microsecond); s.runAfter = &u }
}

// Priority sets the job's priority (default 5): higher runs first.
func Priority(p int) Option { return func(s *jobSpec) { s.priority = p } }

// Meta stores application data with the job; the library does not read it.
func Meta(m map[string]any) Option { return func(s *jobSpec) { s.meta = m } }

// Queue puts the job in a named queue (default "default"). Workers serve the
// queues they are given.
func Queue(name string) Option {
	return func(s *jobSpec) {
		if name == "" || len(name) > 100 {
			s.err = errorf(ErrBadOption, "queue name %q must have 1 to 100 bytes", name)
		}
		s.queue = name
	}
}

// MaxAttempts sets how many runs the job gets before it ends failed; zero or
// less means unlimited. The default is the plugin's MaxAttempts.
func MaxAttempts(n int) Option { return func(s *jobSpec) { s.maxAttempts = &n } }

// DefaultQueue is the queue jobs go to without the Queue option.
const DefaultQueue = "default"

// Schedule adds a job to the queue through tx. When tx is a transaction the
// job exists only if that transaction commits; on a plain handle the job is
// committed at once. task is a registered function or a task name; a name
// need not be registered in this process. When the task is registered here,
// the arguments are checked against its parameters.
func Schedule(tx *gorm.DB, task any, opts ...Option) (*Job, error) {
	p, err := pluginOf(tx)
	if err != nil {
		return nil, err
	}
	job, err := p.newJob(task, opts)
	if err != nil {
		return nil, err
	}
	if tx.Error != nil {
		return nil, fmt.Errorf("async: schedule %s: the handle already carries an error: %w", job.Name, tx.Error)
	}
	db := tx.Session(&gorm.Session{NewDB: true})
	// ScheduleMany's insert, for one row: one statement whose text does not
	// change. GORM's Create built the INSERT from the model's schema at
	// every call (140 allocations against 64, BenchmarkSchedule) and, on a
	// plain handle, wrapped it in a transaction of its own (three round
	// trips against one).
	rows := []Job{job.Job}
	insert := func(db *gorm.DB) error {
		if err := p.insertJobs(db, rows, 0); err != nil {
			return fmt.Errorf("async: schedule %s: %w", job.Name, err)
		}
		return nil
	}
	if job.groupRef == "" {
		err = insert(db)
	} else {
		// The group and the job: both or neither.
		err = p.atomically(db, func(db *gorm.DB) error {
			var err error
			if rows[0].GroupID, err = p.joinGroup(db, job.groupRef); err != nil {
				return err
			}
			return insert(db)
		})
	}
	if err != nil {
		return nil, err
	}
	return &rows[0], nil
}

// atomically runs work in db's transaction or, on a plain handle, in a
// short transaction of its own, so that work's statements commit together.
// Either way it takes SQLite's write lock first (beginWrite), since work
// reads before it writes. (Unlike Deschedule's, it does not queue behind
// this process's other SQLite writers: a task that schedules through a
// plain handle instead of its own would wait for itself.)
func (p *Plugin) atomically(db *gorm.DB, work func(db *gorm.DB) error) error {
	if inTransaction(db) {
		if err := p.dialect.beginWrite(db); err != nil {
			return err
		}
		return work(db)
	}
	return p.writeTx(db, work)
}

// writeTx runs work in a transaction of its own begun on db, which takes
// the database's write lock first (beginWrite: on SQLite, so that work may
// read before it writes).
//
// Work done in the caller's transaction that reads before it writes calls
// beginWrite too: on SQLite a transaction that has read cannot wait for the
// write lock (SQLite does not run the busy handler to upgrade it), so its
// first write would fail at once with SQLITE_BUSY whenever another
// connection, a running job's, held the lock. (A caller's transaction that
// has already read gets that anyway.)
func (p *Plugin) writeTx(db *gorm.DB, work func(db *gorm.DB) error) error {
	return db.Transaction(func(t *gorm.DB) error {
		if err := p.dialect.beginWrite(t); err != nil {
			return err
		}
		return work(t)
	})
}

// inTransaction reports whether db runs in a transaction (the caller's, or
// a task's), rather than on the pool.
func inTransaction(db *gorm.DB) bool {
	_, ok := db.Statement.ConnPool.(gorm.TxCommitter)
	return ok
}

// newJobRow is a job ready to insert, with its group reference.
type newJobRow struct {
	Job
	groupRef string
}

func (p *Plugin) newJob(task any, opts []Option) (*newJobRow, error) {
	j := &newJobRow{}
	ref, err := p.buildJob(&j.Job, task, opts, nil)
	if err != nil {
		return nil, err
	}
	j.groupRef = ref
	return j, nil
}

// buildJob fills j with the job Schedule would insert for task and opts, and
// returns its group reference. When prev (the job built just before, or nil)
// has the same name and arguments, j takes its identity instead of hashing
// the text form again: ScheduleMany's calls often repeat a task and arguments.
func (p *Plugin) buildJob(j *Job, task any, opts []Option, prev *Job) (string, error) {
	name, t, err := resolveTask(task)
	if err != nil {
		return "", err
	}
	spec := jobSpec{priority: 5, queue: DefaultQueue}
	for _, o := range opts {
		if o != nil {
			o(&spec)
		}
	}
	if spec.err != nil {
		return "", fmt.Errorf("async: schedule %s: %w", name, spec.err)
	}
	args := make([]json.RawMessage, len(spec.args))
	for i, a := range spec.args {
		b, err := json.Marshal(a)
		if err != nil {
			return "", errorf(ErrBadArguments, "task %s argument %d (%T) is not JSON-encodable: %w", name, i+1, a, err)
		}
		args[i] = b
	}
	kwargs := make(map[string]json.RawMessage, len(spec.kwargs))
	for k, v := range spec.kwargs {
		b, err := json.Marshal(v)
		if err != nil {
			return "", errorf(ErrBadArguments, "task %s keyword argument %s (%T) is not JSON-encodable: %w", name, k, v, err)
		}
		kwargs[k] = b
	}
	if t != nil {
		if err := t.checkArgs(args, kwargs); err != nil {
			return "", err
		}
	}
	argsJSON, kwargsJSON := "[]", "{}" // what json.Marshal gives for none
	if len(args) > 0 {
		b, _ := json.Marshal(args)
		argsJSON = string(b)
	}
	if len(kwargs) > 0 {
		b, _ := json.Marshal(kwargs)
		kwargsJSON = string(b)
	}
	meta := "{}"
	if spec.meta != nil {
		b, err := json.Marshal(spec.meta)
		if err != nil {
			return "", errorf(ErrBadArguments, "task %s meta is not JSON-encodable: %w", name, err)
		}
		meta = string(b)
	}
	max := p.maxAttempts()
	if spec.maxAttempts != nil {
		max = *spec.maxAttempts
	}
	*j = Job{
		Name:        name,
		Queue:       spec.queue,
		Args:        argsJSON,
		Kwargs:      kwargsJSON,
		Meta:        meta,
		Priority:    spec.priority,
		Added:       p.now(),
		Scheduled:   spec.runAfter,
		MaxAttempts: max,
	}
	if prev != nil && prev.Name == j.Name && prev.Args == j.Args && prev.Kwargs == j.Kwargs {
		j.Identity = prev.Identity
	} else {
		j.Identity = identityOf(j.Name, j.Args, j.Kwargs)
	}
	return spec.group, nil
}

// Call is one job for ScheduleMany: a task and its options. Build it with Task.
type Call struct {
	task any
	opts []Option
}

// Task describes a job for ScheduleMany, with the same arguments as Schedule.
func Task(task any, opts ...Option) Call { return Call{task: task, opts: opts} }

// ScheduleMany adds many jobs through tx in as few INSERT statements as the
// database allows (on Postgres one per 10,000 jobs; elsewhere chunked under
// the database's limit on bound parameters), and returns them with their IDs,
// in the order of calls. The rows are the ones Schedule would write for the
// same calls. It is all-or-nothing: on a plain handle the chunks share one
// transaction; in a transaction they commit or roll back with it. Every call
// is checked as by Schedule before anything is written.
func ScheduleMany(tx *gorm.DB, calls ...Call) ([]*Job, error) {
	return scheduleMany(tx, calls, 0)
}

// scheduleMany is ScheduleMany with the bulk insert method m (zero: the
// database's best).
func scheduleMany(tx *gorm.DB, calls []Call, m insertMethod) ([]*Job, error) {
	p, err := pluginOf(tx)
	if err != nil {
		return nil, err
	}
	rows := make([]Job, len(calls))
	var refs []string // group reference of each row, when any has one
	var prev *Job
	for i, c := range calls {
		ref, err := p.buildJob(&rows[i], c.task, c.opts, prev)
		if err != nil {
			return nil, fmt.Errorf("%w (job %d of %d)", err, i+1, len(calls))
		}
		if ref != "" {
			if refs == nil {
				refs = make([]string, len(calls))
			}
			refs[i] = ref
		}
		prev = &rows[i]
	}
	if len(rows) == 0 {
		return nil, nil
	}
	if tx.Error != nil {
		return nil, fmt.Errorf("async: schedule many: the handle already carries an error: %w", tx.Error)
	}
	db := tx.Session(&gorm.Session{NewDB: true})
	// In a transaction, a savepoint: a failed chunk takes the others back
	// with it even if the caller commits anyway.
	err = db.Transaction(func(db *gorm.DB) error {
		if refs != nil {
			// It reads groups before it writes: on SQLite it takes the
			// write lock first (beginWrite), in the caller's transaction too.
			if err := p.dialect.beginWrite(db); err != nil {
				return err
			}
		}
		groups := map[string]*int64{}
		for i, ref := range refs {
			if ref == "" {
				continue
			}
			if groups[ref] == nil {
				if groups[ref], err = p.joinGroup(db, ref); err != nil {
					return err
				}
			}
			rows[i].GroupID = groups[ref]
		}
		return p.insertJobs(db, rows, m)
	})
	if err != nil {
		return nil, fmt.Errorf("async: schedule many: %w", err)
	}
	out := make([]*Job, len(rows))
	for i := range rows {
		out[i] = &rows[i]
	}
	return out, nil
}
