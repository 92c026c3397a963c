package main

import (
	"context"
	"errors"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// loop runs step in conc goroutines for d and returns the rate of the units
// step reports (jobs or transactions per second). A step error ends the loop.
func loop(parent context.Context, conc int, d time.Duration, step func(ctx context.Context, g int) (int, error)) (float64, error) {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	var total atomic.Int64
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(d)
	for g := 0; g < conc; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil && time.Now().Before(deadline) {
				n, err := step(ctx, g)
				if err != nil {
					once.Do(func() { firstErr = err; cancel() })
					return
				}
				total.Add(int64(n))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := parent.Err(); err != nil {
		return 0, err
	}
	if firstErr != nil {
		return 0, firstErr
	}
	return float64(total.Load()) / elapsed.Seconds(), nil
}

// rateOver samples count at the start and end of d and returns the rate,
// with a note on the CPU spent meanwhile.
func rateOver(ctx context.Context, d time.Duration, count func() int64, inProcess bool) (float64, string, error) {
	c0, t0, s0 := count(), time.Now(), takeCPU()
	pause(ctx, d)
	if err := ctx.Err(); err != nil {
		return 0, "", err
	}
	c1, t1, s1 := count(), time.Now(), takeCPU()
	return float64(c1-c0) / t1.Sub(t0).Seconds(), cpuNote(s0, s1, c1-c0, inProcess), nil
}

// loopCPU is loop with a note on the CPU it spent.
func loopCPU(ctx context.Context, conc int, d time.Duration, step func(ctx context.Context, g int) (int, error)) (float64, string, error) {
	s0, t0 := takeCPU(), time.Now()
	rate, err := loop(ctx, conc, d, step)
	s1 := takeCPU()
	return rate, cpuNote(s0, s1, int64(rate*time.Since(t0).Seconds()), true), err
}

// percentiles returns the given quantiles (0..1) of xs, nearest rank.
func percentiles(xs []float64, qs ...float64) []float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	out := make([]float64, len(qs))
	for i, q := range qs {
		if len(s) == 0 {
			out[i] = math.NaN()
			continue
		}
		k := int(math.Ceil(q*float64(len(s)))) - 1
		out[i] = s[max(0, min(k, len(s)-1))]
	}
	return out
}

// warmup is how long a throughput case runs before it is measured.
func warmup(d time.Duration) time.Duration {
	return min(max(d/5, 300*time.Millisecond), 2*time.Second)
}

// atomicCounter is an atomic.Int64 with a method value for count callbacks.
type atomicCounter struct{ atomic.Int64 }

func (a *atomicCounter) get() int64 { return a.Load() }

// errorsJoin is errors.Join that keeps the first error first.
func errorsJoin(errs ...error) error { return errors.Join(errs...) }
