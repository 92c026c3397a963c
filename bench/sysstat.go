package main

import (
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"
)

// CPU accounting for a measured window: how busy the whole machine was (the
// machine is shared, so a low figure next to a saturated host is not the
// library's fault alone) and how much CPU this process spent per job.

type cpuSnap struct {
	busy, idle, iowait int64 // host jiffies from /proc/stat
	proc               time.Duration
	ok                 bool
}

// procCPU is the CPU time (user and system) this process has used.
func procCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func takeCPU() cpuSnap {
	s := cpuSnap{proc: procCPU()}
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return s
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 6 || f[0] != "cpu" {
		return s
	}
	for i, v := range f[1:] {
		n := atoi64(v)
		switch i {
		case 3:
			s.idle += n
		case 4:
			s.iowait += n
		default:
			if i < 8 { // user nice system idle iowait irq softirq steal
				s.busy += n
			}
		}
	}
	s.ok = true
	return s
}

// cpuNote describes the window from a to b in which jobs ran.
func cpuNote(a, b cpuSnap, jobs int64, inProcess bool) string {
	var parts []string
	if inProcess && jobs > 0 {
		parts = append(parts, fmt.Sprintf("bench %.0fµs cpu/job", float64((b.proc-a.proc).Microseconds())/float64(jobs)))
	}
	if a.ok && b.ok {
		busy, idle, wait := b.busy-a.busy, b.idle-a.idle, b.iowait-a.iowait
		if tot := busy + idle + wait; tot > 0 {
			parts = append(parts, fmt.Sprintf("host cpu %d%% busy, %d%% iowait", 100*busy/tot, 100*wait/tot))
		}
	}
	return strings.Join(parts, "; ")
}
