package async

import (
	"fmt"

	"gorm.io/gorm"
)

// Test hooks, compiled only into this package's tests.

// InsertMethods names the bulk insert methods ScheduleManyWith can force.
var InsertMethods = map[string]insertMethod{
	"unnest":    insertUnnest,
	"returning": insertValuesReturning,
	"lastid":    insertValuesLastID,
}

// ScheduleManyWith is ScheduleMany with the bulk insert method forced, so
// that tests reach every method on the servers they have.
func ScheduleManyWith(method string, tx *gorm.DB, calls ...Call) ([]*Job, error) {
	m, ok := InsertMethods[method]
	if !ok {
		return nil, fmt.Errorf("async: unknown insert method %q", method)
	}
	return scheduleMany(tx, calls, m)
}
