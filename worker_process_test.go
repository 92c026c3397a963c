//go:build unix

package async_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gorm.io/gorm"

	"github.com/gormasync/async"
)

// Worker processes: the test binary re-executes itself as a helper process
// (TestWorkerHelperProcess) that opens the test's database with the plugin
// and runs a Worker, or schedules a job, as told by ASYNC_HELPER_* variables.
// Helpers report on stdout, one line per event, prefixed by helperPrefix.

const (
	helperRoleEnv = "ASYNC_HELPER_ROLE"
	helperPrefix  = "ASYNC-HELPER"
)

// procTask is the task of the multi-process tests. It writes an Effect keyed
// by key in the job's transaction and, in a helper process, reports
// "ran <key>" on stdout (so the test counts runs across processes); then
// mode "block" blocks until the process ends and mode "die" kills its own
// process with SIGKILL. In the test process itself every mode succeeds.
func procTask(ctx context.Context, tx *gorm.DB, key, mode string) error {
	if err := tx.Create(&Effect{K: key}).Error; err != nil {
		return err
	}
	if os.Getenv(helperRoleEnv) == "" {
		countRun(key)
		return nil
	}
	fmt.Printf("%s ran %s %d\n", helperPrefix, key, os.Getpid())
	switch mode {
	case "block":
		<-ctx.Done()
		return ctx.Err()
	case "die":
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
	return nil
}

func init() { async.MustRegister(procTask) }

// TestWorkerHelperProcess is not a test: it is the entry point of helper
// processes, and skips in a normal run.
func TestWorkerHelperProcess(t *testing.T) {
	role := os.Getenv(helperRoleEnv)
	if role == "" {
		return // not a test: the entry point of the multi-process tests' helper processes
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	db := openDB(t, os.Getenv("ASYNC_HELPER_KIND"), os.Getenv("ASYNC_HELPER_DSN"), nil)
	require.NoError(t, db.Use(&async.Plugin{SkipMigration: true, Logger: logger}))
	switch role {
	case "worker":
		lease, err := time.ParseDuration(os.Getenv("ASYNC_HELPER_LEASE"))
		require.NoError(t, err)
		conc, err := strconv.Atoi(os.Getenv("ASYNC_HELPER_CONCURRENCY"))
		require.NoError(t, err)
		w, err := async.NewWorker(db, async.WorkerOptions{Concurrency: conc, Lease: lease,
			PollInterval: 50 * time.Millisecond, ShutdownTimeout: 5 * time.Second})
		require.NoError(t, err)
		if s := os.Getenv("ASYNC_HELPER_STALE"); s != "" {
			stale, err := time.ParseDuration(s)
			require.NoError(t, err)
			async.SetStaleAfter(w, stale) // how long jobs claimed ahead wait for a slot
		}
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
		defer stop()
		fmt.Printf("%s ready\n", helperPrefix)
		require.NoError(t, w.Run(ctx))
	case "schedule":
		job, err := async.Schedule(db, procTask, async.Args(os.Getenv("ASYNC_HELPER_KEY"), "ok"))
		require.NoError(t, err)
		fmt.Printf("%s scheduled %d\n", helperPrefix, job.ID)
	default:
		t.Fatalf("unknown helper role %q", role)
	}
}

// procRunLog counts, per key, the "ran" reports of all helper processes.
type procRunLog struct {
	mu    sync.Mutex
	n     map[string]int
	byPID map[string]int
}

func newProcRunLog() *procRunLog { return &procRunLog{n: map[string]int{}, byPID: map[string]int{}} }

func (r *procRunLog) add(key, pid string) {
	r.mu.Lock()
	r.n[key]++
	r.byPID[pid]++
	r.mu.Unlock()
}

// perProcess is how many runs each process reported.
func (r *procRunLog) perProcess() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.byPID)
}

func (r *procRunLog) count(key string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n[key]
}

// helperProc is a running helper process.
type helperProc struct {
	t      *testing.T
	cmd    *exec.Cmd
	exited chan struct{}
	mu     sync.Mutex
	stderr bytes.Buffer
	ready  chan struct{}
}

// helperWorker starts a helper process running a Worker on d's database.
func helperWorker(t *testing.T, d *testDB, rl *procRunLog, concurrency int, lease time.Duration) *helperProc {
	return startHelper(t, d, rl, "worker",
		"ASYNC_HELPER_CONCURRENCY="+strconv.Itoa(concurrency), "ASYNC_HELPER_LEASE="+lease.String())
}

func startHelper(t *testing.T, d *testDB, rl *procRunLog, role string, env ...string) *helperProc {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestWorkerHelperProcess$", "-test.count=1", "-test.timeout=5m")
	cmd.Env = append(os.Environ(), helperRoleEnv+"="+role, "ASYNC_HELPER_KIND="+d.Kind, "ASYNC_HELPER_DSN="+d.DSN)
	cmd.Env = append(cmd.Env, env...)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	h := &helperProc{t: t, cmd: cmd, exited: make(chan struct{}), ready: make(chan struct{})}
	cmd.Stderr = writerFunc(func(b []byte) (int, error) {
		h.mu.Lock()
		defer h.mu.Unlock()
		return h.stderr.Write(b)
	})
	require.NoError(t, cmd.Start())
	lines := make(chan struct{})
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) < 2 || f[0] != helperPrefix {
				continue
			}
			switch f[1] {
			case "ready":
				close(h.ready)
			case "ran":
				if rl != nil && len(f) == 4 {
					rl.add(f[2], f[3])
				}
			}
		}
		_, _ = io.Copy(io.Discard, out)
	}()
	go func() {
		<-lines // all output read before Wait closes the pipe
		_ = cmd.Wait()
		close(h.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-h.exited:
		default:
			_ = cmd.Process.Kill()
			<-h.exited
		}
		if t.Failed() {
			h.mu.Lock()
			t.Logf("helper %d (%s) stderr:\n%s", cmd.Process.Pid, role, h.stderr.String())
			h.mu.Unlock()
		}
	})
	return h
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

// waitExit waits for the process to end and returns its wait status.
func (h *helperProc) waitExit(timeout time.Duration) syscall.WaitStatus {
	h.t.Helper()
	recv(h.t, h.exited, timeout, fmt.Sprintf("helper %d to exit", h.cmd.Process.Pid))
	return h.cmd.ProcessState.Sys().(syscall.WaitStatus)
}

// stop sends SIGTERM (the worker drains gracefully) and requires a clean exit.
func (h *helperProc) stop() {
	h.t.Helper()
	// Before "ready" the helper may not handle SIGTERM yet.
	select {
	case <-h.ready:
	case <-h.exited:
	case <-time.After(time.Minute):
		h.t.Fatalf("helper %d never got ready", h.cmd.Process.Pid)
	}
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	ws := h.waitExit(30 * time.Second)
	require.True(h.t, ws.Exited() && ws.ExitStatus() == 0, "helper %d ended with %v", h.cmd.Process.Pid, ws)
}

// kill sends SIGKILL and waits for the process to die.
func (h *helperProc) kill() {
	h.t.Helper()
	require.NoError(h.t, h.cmd.Process.Signal(syscall.SIGKILL))
	ws := h.waitExit(30 * time.Second)
	require.True(h.t, ws.Signaled() && ws.Signal() == syscall.SIGKILL, "helper ended with %v", ws)
}

// Point 1 (processes): several worker processes drain M jobs; each job's
// task runs once and commits once.
func TestWorkerProcessesRunEachJobExactlyOnce(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		const m, procs = 30, 3
		keys := make([]string, m)
		for i := range keys {
			keys[i] = newKey(t, "job")
		}
		for _, k := range keys[:m/2] {
			_, err := async.Schedule(d.DB, procTask, async.Args(k, "ok"))
			require.NoError(t, err)
		}
		rl := newProcRunLog()
		var hs []*helperProc
		for i := 0; i < procs; i++ {
			hs = append(hs, helperWorker(t, d, rl, 2, time.Minute))
		}
		// The rest arrive while the workers run, in one transaction.
		require.NoError(t, d.DB.Transaction(func(tx *gorm.DB) error {
			for _, k := range keys[m/2:] {
				if _, err := async.Schedule(tx, procTask, async.Args(k, "ok")); err != nil {
					return err
				}
			}
			return nil
		}))
		waitFor(t, 2*time.Minute, "all jobs executed", func() bool {
			return count(t, d.DB, "async_job", "executed IS NOT NULL") == m
		})
		for _, h := range hs {
			h.stop()
		}
		assert.EqualValues(t, m, count(t, d.DB, "effects", ""))
		for _, k := range keys {
			assert.EqualValues(t, 1, effects(t, d.DB, k), "committed effects of %s", k)
			assert.Equal(t, 1, rl.count(k), "runs of %s across processes", k)
		}
		assert.Zero(t, count(t, d.DB, "async_error", ""))
		assert.Zero(t, count(t, d.DB, "async_job", "attempts <> 1"), "every job ran on its first attempt")
		t.Logf("runs per process: %v", rl.perProcess())
	})
}

// Point 10b: on Postgres a worker polling once an hour picks up a job
// committed by another process or another *gorm.DB (whose in-process
// wake-ups do not reach it), through NOTIFY. MariaDB and SQLite have no such
// signal: there other processes' jobs are found by polling, which this test
// checks with a short poll interval.
func TestWorkerWakesOnCommitInAnotherProcess(t *testing.T) {
	eachDB(t, func(t *testing.T, d *testDB) {
		migrateApp(t, d)
		poll := time.Hour
		if d.Kind != "postgres" {
			poll = 100 * time.Millisecond
		}
		idleWorker(t, d, poll)
		if d.Kind == "postgres" {
			waitFor(t, time.Minute, "the worker to LISTEN", func() bool {
				return count(t, d.DB, "pg_stat_activity", "datname = current_database() AND state = 'idle' AND query = ?", "LISTEN async_job") == 1
			})
		}

		other := secondHandle(t, d, d.DSN, nil)
		job := scheduleCtl(t, other, newKey(t, "other-handle"))
		waitJob(t, d.DB, job.ID, 30*time.Second, "picked up after another handle's commit", executed)

		key := newKey(t, "other-process")
		h := startHelper(t, d, nil, "schedule", "ASYNC_HELPER_KEY="+key)
		ws := h.waitExit(time.Minute)
		require.True(t, ws.Exited() && ws.ExitStatus() == 0, "scheduling helper ended with %v", ws)
		waitFor(t, 30*time.Second, "the other process's job executed", func() bool { return effects(t, d.DB, key) == 1 })
	})
}
