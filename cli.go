package async

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"

	"gorm.io/gorm"
)

// RunCommand runs one of the management subcommands, so that any
// application's main can offer them:
//
//	flush_queue [--jobs|-j N] [--which|-w W --outof|-o O] [--filter|-f PREFIX] [--queue Q] [--timeout D]
//	queue_health [--algorithm|-a rough|precise]   (default precise, like the reference command)
//	retry JOB_ID
//
// It returns the process exit status: 1 when flush_queue stopped at a
// failing job or on any other error, 2 for a usage error (including an
// unknown estimation algorithm). As in the reference, flush_queue prints
// "Lock is already set, aborting." and exits 0 when another run holds its
// partition. Register the application's tasks before calling it.
func RunCommand(ctx context.Context, db *gorm.DB, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: flush_queue|queue_health|retry [options]")
		return 2
	}
	db = db.WithContext(ctx)
	cmd, rest := args[0], args[1:]
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	switch cmd {
	case "flush_queue":
		var o FlushOptions
		var queues string
		fs.IntVar(&o.Jobs, "jobs", DefaultFlushJobs, "most jobs to run (0 means 300)")
		fs.IntVar(&o.Jobs, "j", DefaultFlushJobs, "shorthand for --jobs")
		fs.IntVar(&o.Which, "which", 0, "this runner's partition number")
		fs.IntVar(&o.Which, "w", 0, "shorthand for --which")
		fs.IntVar(&o.OutOf, "outof", 1, "number of partitions")
		fs.IntVar(&o.OutOf, "o", 1, "shorthand for --outof")
		fs.StringVar(&o.Filter, "filter", "", "run only tasks whose name starts with this prefix")
		fs.StringVar(&o.Filter, "f", "", "shorthand for --filter")
		fs.StringVar(&queues, "queue", "", "comma-separated queues to run (default all)")
		fs.DurationVar(&o.Timeout, "timeout", 0, "per-job timeout (0: none)")
		if fs.Parse(rest) != nil {
			return 2
		}
		if fs.NArg() != 0 {
			fmt.Fprintf(stderr, "flush_queue: unexpected argument %q\n", fs.Arg(0))
			return 2
		}
		if queues != "" {
			o.Queues = strings.Split(queues, ",")
		}
		o.Out = stdout
		n, err := FlushQueue(db, o)
		switch {
		case errors.Is(err, ErrPartitionBusy):
			fmt.Fprintln(stdout, "Lock is already set, aborting.")
			return 0
		case errors.Is(err, ErrBadOption) && n == 0:
			fmt.Fprintf(stderr, "flush_queue: %v\n", err)
			return 2
		case err != nil:
			fmt.Fprintf(stderr, "flush_queue: %d job(s) ran; stopped: %v\n", n, err)
			return 1
		case n == 0:
			fmt.Fprintln(stdout, "No jobs to execute")
		default:
			fmt.Fprintf(stdout, "%d job(s) executed\n", n)
		}
		return 0
	case "queue_health":
		var algorithm string
		fs.StringVar(&algorithm, "algorithm", AlgorithmPrecise, "estimation algorithm: rough or precise")
		fs.StringVar(&algorithm, "a", AlgorithmPrecise, "shorthand for --algorithm")
		if fs.Parse(rest) != nil {
			return 2
		}
		if fs.NArg() != 0 {
			fmt.Fprintf(stderr, "queue_health: unexpected argument %q\n", fs.Arg(0))
			return 2
		}
		rep, err := Health(db, Algorithm(algorithm))
		if errors.Is(err, ErrUnknownAlgorithm) {
			fmt.Fprintf(stderr, "queue_health: %v\n", err)
			return 2
		}
		if err != nil {
			fmt.Fprintf(stderr, "queue_health: %v\n", err)
			return 1
		}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(rep)
		return 0
	case "retry":
		if fs.Parse(rest) != nil || fs.NArg() != 1 {
			fmt.Fprintln(stderr, "usage: retry JOB_ID")
			return 2
		}
		id, err := strconv.ParseInt(fs.Arg(0), 10, 64)
		if err != nil {
			fmt.Fprintf(stderr, "usage: retry JOB_ID (%q is not a job id)\n", fs.Arg(0))
			return 2
		}
		if err = Retry(db, id); err != nil {
			fmt.Fprintf(stderr, "retry: %v\n", err)
			return 1
		}
		fmt.Fprintf(stdout, "job %d will run again\n", id)
		return 0
	}
	fmt.Fprintf(stderr, "unknown command %q (want flush_queue, queue_health or retry)\n", cmd)
	return 2
}
