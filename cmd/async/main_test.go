package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/gormasync/async/internal/dbopen"
)

// The test binary runs main when this variable is set: the tests run the
// command as a process of its own, exit status and all.
const runMain = "ASYNC_CMD_TEST_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMain) == "1" {
		main()
		return
	}
	os.Exit(m.Run())
}

// command runs the command with args and the environment variables env,
// and returns its exit status and output.
func command(t *testing.T, env []string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(append(os.Environ(), runMain+"=1", "ASYNC_DSN="), env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return exit.ExitCode(), out.String(), errOut.String()
	}
	require.NoError(t, err)
	return 0, out.String(), errOut.String()
}

// tables lists the SQLite database's tables.
func tables(t *testing.T, path string) []string {
	t.Helper()
	db, err := dbopen.Open(path)
	require.NoError(t, err)
	sqlDB, err := db.DB()
	require.NoError(t, err)
	defer sqlDB.Close()
	var names []string
	require.NoError(t, db.Raw("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").Scan(&names).Error)
	return names
}

// The tool inspects a database without changing it: on one without the
// queue's tables it fails with the database's error and creates nothing;
// -migrate creates them. The DSN comes from -dsn or ASYNC_DSN; without one
// it is a usage error.
func TestCommandMigratesOnlyWhenAsked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "queue.db")

	code, _, errOut := command(t, nil, "-dsn", path, "queue_health")
	assert.Equal(t, 1, code, errOut)
	assert.Contains(t, errOut, "no such table")
	assert.Empty(t, tables(t, path), "no table created without -migrate")

	code, out, errOut := command(t, []string{"ASYNC_DSN=" + path}, "-migrate", "queue_health", "--algorithm", "rough")
	require.Equal(t, 0, code, errOut)
	var rep map[string]map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &rep), out)
	assert.EqualValues(t, 0, rep["queue"]["all-jobs"])
	assert.Equal(t, "rough", rep["queue"]["estimation-algorithm"])
	assert.Contains(t, tables(t, path), "async_job")

	code, _, errOut = command(t, nil, "queue_health")
	assert.Equal(t, 2, code, "no DSN: %s", errOut)
	assert.Contains(t, errOut, "usage: async -dsn DSN")
}
