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
	steal              int64 // of busy: time the hypervisor gave to others
	proc               time.Duration
	server             int64 // jiffies of the local database servers' processes
	ok                 bool
}

// serverNames are the process names of the database servers on this host.
var serverNames = map[string]bool{"postgres": true, "mariadbd": true, "mysqld": true}

// serverJiffies sums the CPU (user and system, with that of reaped children,
// such as Postgres backends that exited) of the database server processes
// running on this host; 0 where /proc cannot tell.
func serverJiffies() int64 {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	var n int64
	for _, e := range ents {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		open, close := strings.IndexByte(string(b), '('), strings.LastIndexByte(string(b), ')')
		if open < 0 || close < open || !serverNames[string(b[open+1:close])] {
			continue
		}
		f := strings.Fields(string(b[close+1:]))
		if len(f) < 15 {
			continue
		}
		for _, v := range f[11:15] { // utime stime cutime cstime
			n += atoi64(v)
		}
	}
	return n
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
	s := cpuSnap{proc: procCPU(), server: serverJiffies()}
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
		case 7:
			s.steal += n
			s.busy += n
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
	if srv := b.server - a.server; jobs > 0 && srv > 0 {
		// jiffies are 10ms (USER_HZ 100 on Linux)
		parts = append(parts, fmt.Sprintf("server %.0fµs cpu/job", float64(srv)*1e4/float64(jobs)))
	}
	if a.ok && b.ok {
		busy, idle, wait, steal := b.busy-a.busy, b.idle-a.idle, b.iowait-a.iowait, b.steal-a.steal
		if tot := busy + idle + wait; tot > 0 {
			parts = append(parts, fmt.Sprintf("host cpu %d%% busy (%d%% stolen by the hypervisor), %d%% iowait", 100*busy/tot, 100*steal/tot, 100*wait/tot))
		}
	}
	return strings.Join(parts, "; ")
}
