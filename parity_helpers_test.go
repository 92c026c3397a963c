package async_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Helpers shared by the parity_*_test.go files.

// freezeClock stops the real-time part of d's clock: from now on db.NowFunc
// moves only with d.Clock.Advance, so tests can hit exact cutoffs. It returns
// the frozen current time, at the microsecond precision the plugin uses.
// Call it before starting any goroutine that reads the clock.
func freezeClock(d *testDB) time.Time {
	base := time.Now().UTC().Truncate(time.Microsecond).Add(-time.Duration(d.Clock.offset.Load()))
	d.DB.Config.NowFunc = func() time.Time { return base.Add(time.Duration(d.Clock.offset.Load())) }
	return d.DB.Config.NowFunc()
}

// frozenNow is the plugin's current time after freezeClock (d.Clock.Now
// still reads the real clock).
func frozenNow(d *testDB) time.Time { return d.DB.Config.NowFunc().UTC() }

// plugin returns the plugin installed on d, so a test can set its fields
// (before anything runs).
func plugin(t testing.TB, d *testDB) *async.Plugin {
	t.Helper()
	p, ok := d.DB.Config.Plugins["async"].(*async.Plugin)
	require.True(t, ok)
	return p
}

// runLog records the order in which parityRecord jobs run, per log name.
var runLog = struct {
	sync.Mutex
	m map[string][]string
}{m: map[string][]string{}}

// freshLog returns the test's name as a run log (and gate) key, with its run
// log emptied, so that tests can run again in one process (-count).
func freshLog(t testing.TB) string {
	runLog.Lock()
	defer runLog.Unlock()
	delete(runLog.m, t.Name())
	return t.Name()
}

func logged(name string) []string {
	runLog.Lock()
	defer runLog.Unlock()
	return append([]string(nil), runLog.m[name]...)
}

// parityRecord appends label to the run log named log.
func parityRecord(ctx context.Context, tx *gorm.DB, log, label string) error {
	runLog.Lock()
	defer runLog.Unlock()
	runLog.m[log] = append(runLog.m[log], label)
	return nil
}

// parityFail records label, then fails.
func parityFail(ctx context.Context, tx *gorm.DB, log, label string) error {
	_ = parityRecord(ctx, tx, log, label)
	return errors.New("parity failure " + label)
}

// gate is a running job the test holds: the task signals started, then waits
// for release.
type gate struct {
	started chan struct{}
	release chan struct{}
}

var gates sync.Map // key -> *gate

func newGate(key string) *gate {
	g := &gate{started: make(chan struct{}), release: make(chan struct{})}
	gates.Store(key, g)
	return g
}

// parityBlock blocks, inside its job's transaction, until the test releases
// its gate (or the run is cancelled).
func parityBlock(ctx context.Context, tx *gorm.DB, key string) error {
	v, ok := gates.Load(key)
	if !ok {
		return errors.New("no gate " + key)
	}
	g := v.(*gate)
	close(g.started)
	select {
	case <-g.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Minute):
		return errors.New("gate " + key + " never released")
	}
}

// waitStarted waits for the gate's job to start running.
func waitStarted(t testing.TB, g *gate) {
	t.Helper()
	select {
	case <-g.started:
	case <-time.After(30 * time.Second):
		t.Fatal("the blocking job did not start")
	}
}

// parityKw records "kw" in the run log named log.
func parityKw(ctx context.Context, tx *gorm.DB, log string, kw async.Kwargs) error {
	return parityRecord(ctx, tx, log, "kw")
}

var parityKwName string

var tickClocks sync.Map // key -> *testClock

// parityTick advances the test clock registered under key by seconds: a
// task that "takes" that long on the test clock.
func parityTick(ctx context.Context, tx *gorm.DB, key string, seconds int) error {
	v, ok := tickClocks.Load(key)
	if !ok {
		return errors.New("no clock " + key)
	}
	v.(*testClock).Advance(time.Duration(seconds) * time.Second)
	return nil
}

func init() {
	parityKwName = async.MustRegister(parityKw)
	async.MustRegister(parityRecord)
	async.MustRegister(parityTick)
	async.MustRegister(parityFail)
	async.MustRegister(parityBlock)
}

// jobState reads a job back.
func jobState(t testing.TB, d *testDB, id int64) *async.Job {
	t.Helper()
	return getJob(t, d.DB, id)
}

func mustSchedule(t testing.TB, db *gorm.DB, task any, opts ...async.Option) *async.Job {
	t.Helper()
	j, err := async.Schedule(db, task, opts...)
	require.NoError(t, err)
	return j
}

func flush(t testing.TB, d *testDB, o async.FlushOptions) int {
	t.Helper()
	n, err := async.FlushQueue(d.DB, o)
	require.NoError(t, err)
	return n
}
