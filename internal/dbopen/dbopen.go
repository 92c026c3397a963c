// Package dbopen opens a *gorm.DB from a DSN for the examples and commands:
// postgres://... or a key=value DSN with host= for PostgreSQL, a DSN with
// @tcp( or @unix( for MySQL/MariaDB, anything else a SQLite file path.
package dbopen

import (
	"strings"

	"github.com/libtnb/sqlite"
	"gorm.io/driver/mysql"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"
)

// SQLiteDSN is the DSN of a SQLite file with the settings a job queue
// wants: wait up to 10s for the write lock, WAL journal.
func SQLiteDSN(path string) string {
	if strings.Contains(path, "?") {
		return path
	}
	return path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)"
}

// Dialector picks the GORM dialector for dsn.
func Dialector(dsn string) gorm.Dialector {
	switch {
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"), strings.Contains(dsn, "host="):
		return postgres.Open(dsn)
	case strings.Contains(dsn, "@tcp("), strings.Contains(dsn, "@unix("):
		return mysql.Open(dsn)
	}
	return sqlite.Open(SQLiteDSN(dsn))
}

// Open opens dsn with GORM's logger quiet except for errors.
func Open(dsn string) (*gorm.DB, error) {
	return gorm.Open(Dialector(dsn), &gorm.Config{Logger: logger.Default.LogMode(logger.Error)})
}
