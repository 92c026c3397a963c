package main

import "syscall"

// childProcAttr kills a child when the bench process dies, so that an
// interrupted bench leaves no stray workers.
func childProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
