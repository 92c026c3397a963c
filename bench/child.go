package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gormasync/async"
)

// Child processes: the bench re-executes its own binary as a worker (for the
// two-process and memory cases) or as a producer (for out-of-process pickup
// latency). The child's spec travels in an environment variable; the child
// talks back in lines on stdout ("ready", "stat EXECUTED RSS_KB HWM_KB CPU_US",
// "commit SEQ UNIXNANO") and stops when its stdin closes. Every child is
// waited for; on Linux it is also killed if the bench dies.

const (
	childFlag = "-bench-child" // hidden: argv[1] of a child
	childEnv  = "ASYNC_BENCH_CHILD"
)

type childSpec struct {
	Mode         string        `json:"mode"` // "worker" or "producer"
	Kind         string        `json:"kind"`
	DSN          string        `json:"dsn"`
	Task         string        `json:"task,omitempty"`
	Concurrency  int           `json:"concurrency,omitempty"`
	BatchSize    int           `json:"batch_size,omitempty"`
	PollInterval time.Duration `json:"poll_interval,omitempty"`
	Prefetch     int           `json:"prefetch,omitempty"`
	Jobs         int           `json:"jobs,omitempty"` // producer: how many
	Gap          time.Duration `json:"gap,omitempty"`  // producer: pause between commits
	// CPUProfile, if set, is where a worker writes a CPU profile of the
	// ProfileFor that follows its first ProfileAfter (the parent's warm-up
	// and measuring window).
	CPUProfile   string        `json:"cpu_profile,omitempty"`
	ProfileAfter time.Duration `json:"profile_after,omitempty"`
	ProfileFor   time.Duration `json:"profile_for,omitempty"`
}

// child is a running child process, seen from the parent.
type child struct {
	cmd      *exec.Cmd
	stdin    io.WriteCloser
	executed atomic.Int64
	rssKB    atomic.Int64
	hwmKB    atomic.Int64
	cpuUS    atomic.Int64
	ready    chan struct{}
	exited   chan struct{}
	waitErr  error
}

// startChild starts the bench binary as a child; onLine (may be nil) gets
// the lines that are not ready or stat lines, from one goroutine.
func startChild(spec childSpec, onLine func(fields []string)) (*child, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	c := &child{ready: make(chan struct{}), exited: make(chan struct{})}
	c.cmd = exec.Command(exe, childFlag)
	c.cmd.Env = append(os.Environ(), childEnv+"="+string(b))
	c.cmd.Stderr = os.Stderr
	c.cmd.SysProcAttr = childProcAttr()
	if c.stdin, err = c.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	out, err := c.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := c.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		var once sync.Once
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			switch {
			case len(f) == 1 && f[0] == "ready":
				once.Do(func() { close(c.ready) })
			case len(f) == 5 && f[0] == "stat":
				c.executed.Store(atoi64(f[1]))
				c.rssKB.Store(atoi64(f[2]))
				c.hwmKB.Store(atoi64(f[3]))
				c.cpuUS.Store(atoi64(f[4]))
			case onLine != nil && len(f) > 0:
				onLine(f)
			}
		}
		_, _ = io.Copy(io.Discard, out)
		c.waitErr = c.cmd.Wait()
		close(c.exited)
	}()
	return c, nil
}

func atoi64(s string) int64 { n, _ := strconv.ParseInt(s, 10, 64); return n }

// waitReady waits for the child's "ready" line.
func (c *child) waitReady(ctx context.Context, timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-c.ready:
		return nil
	case <-c.exited:
		return fmt.Errorf("child exited before it was ready: %v", c.waitErr)
	case <-t.C:
		return errors.New("child not ready in time")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// stop asks the child to finish (closes its stdin), kills it after timeout,
// and waits for it.
func (c *child) stop(timeout time.Duration) error {
	_ = c.stdin.Close()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-c.exited:
	case <-t.C:
		_ = c.cmd.Process.Kill()
		<-c.exited
		return fmt.Errorf("child %d did not stop in %s; killed", c.cmd.Process.Pid, timeout)
	}
	return c.waitErr
}

// childMain is main for a child process.
func childMain([]string) int {
	var spec childSpec
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "bench child: bad spec:", err)
		return 2
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { // the parent closes our stdin to stop us
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	var err error
	switch spec.Mode {
	case "worker":
		err = childWorker(ctx, spec)
	case "producer":
		err = childProducer(ctx, spec)
	default:
		err = fmt.Errorf("unknown mode %q", spec.Mode)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench child (%s %s): %v\n", spec.Kind, spec.Mode, err)
		return 1
	}
	return 0
}

var stdoutMu sync.Mutex

func say(format string, a ...any) {
	stdoutMu.Lock()
	defer stdoutMu.Unlock()
	fmt.Fprintf(os.Stdout, format+"\n", a...)
}

// childWorker runs a worker and reports its executed count and memory every
// 100ms until its stdin closes.
func childWorker(ctx context.Context, spec childSpec) error {
	var n atomic.Int64
	e := &env{kind: spec.Kind, dsn: spec.DSN}
	db, closeDB, err := e.openGorm(spec.Concurrency+3, countingPlugin(&n, true))
	if err != nil {
		return err
	}
	defer closeDB()
	prefetch = spec.Prefetch
	w, err := newWorker(db, spec.Concurrency, spec.BatchSize, spec.PollInterval)
	if err != nil {
		return err
	}
	if spec.CPUProfile != "" {
		profiled := make(chan struct{})
		defer func() { <-profiled }()
		go func() {
			defer close(profiled)
			profileWindow(ctx, spec.CPUProfile, spec.ProfileAfter, spec.ProfileFor)
		}()
	}
	runErr := make(chan error, 1)
	go func() { runErr <- w.Run(ctx) }()
	stat := func() {
		rss, hwm := procMemKB()
		say("stat %d %d %d %d", n.Load(), rss, hwm, procCPU().Microseconds())
	}
	say("ready")
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case err := <-runErr:
			stat()
			return err
		case <-t.C:
			stat()
		}
	}
}

// childProducer schedules spec.Jobs latency jobs one per transaction, with
// a gap, and reports the time each commit returned.
func childProducer(ctx context.Context, spec childSpec) error {
	e := &env{kind: spec.Kind, dsn: spec.DSN}
	db, closeDB, err := e.openGorm(2, &async.Plugin{SkipMigration: true})
	if err != nil {
		return err
	}
	defer closeDB()
	say("ready")
	for seq := 1; seq <= spec.Jobs && ctx.Err() == nil; seq++ {
		at, err := commitOne(db, seq)
		if err != nil {
			return err
		}
		say("commit %d %d", seq, at.UnixNano())
		pause(ctx, spec.Gap)
	}
	return nil
}

// procMemKB reads this process's resident set and its peak from /proc.
func procMemKB() (rss, hwm int64) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			rss = atoi64(f[1])
		case "VmHWM:":
			hwm = atoi64(f[1])
		}
	}
	return rss, hwm
}

// pause sleeps d or until ctx ends.
func pause(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// profileWindow writes a CPU profile to path of the span from after to
// after+span from now, cut short if ctx ends.
func profileWindow(ctx context.Context, path string, after, span time.Duration) {
	if pause(ctx, after); ctx.Err() != nil {
		return
	}
	stop, err := startProfile(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench child: cpuprofile:", err)
		return
	}
	defer stop()
	pause(ctx, span)
}
