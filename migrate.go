package async

import (
	"fmt"

	"gorm.io/gorm"
)

// Migration. Every process migrates its database when it installs the
// plugin, so a process usually migrates beside the others' work: a new
// replica, or a rolling deploy, starts while jobs run. Migration therefore
// changes only what the schema lacks, each part found missing by a
// catalogue read, and on a current schema runs no DDL at all and takes no
// lock on the tables. (GORM's AutoMigrate, used before, altered every
// timestamp column on Postgres at each start, ALTER COLUMN TYPE
// timestamptz(6) of a timestamptz(6) column, and the notify trigger was
// dropped and created again: each an ACCESS EXCLUSIVE lock, which waited
// for the running jobs' transactions while every other session's access
// to async_job queued behind it.) Existing columns are never altered.

// schemaModels are the library's tables, in creation order.
var schemaModels = []any{&Job{}, &JobError{}, &Group{}, &partitionLock{}}

// schemaStep is one change that the schema lacks.
type schemaStep struct {
	what string
	do   func(db *gorm.DB) error
}

// migrate makes what the schema lacks. Processes that start together on
// a fresh database (or a new version's, on an older schema) would each find
// the same parts missing and make them at once, and all but one fail (a
// table or index that already exists, or on Postgres a duplicate key in
// pg_type): so the changes are made under a lock of the database's
// (migrationLock), after looking again for what is still missing.
func (p *Plugin) migrate(db *gorm.DB) error {
	steps, err := p.schemaSteps(db)
	if err != nil {
		return fmt.Errorf("async: migrating %s: %w", p.dialect.name, err)
	}
	if len(steps) == 0 {
		return nil
	}
	return p.dialect.migrationLock(db, func(db *gorm.DB) error {
		steps, err := p.schemaSteps(db)
		if err != nil {
			return fmt.Errorf("async: migrating %s: %w", p.dialect.name, err)
		}
		return p.apply(db, steps)
	})
}

// apply makes steps, in order.
func (p *Plugin) apply(db *gorm.DB, steps []schemaStep) error {
	for _, s := range steps {
		if err := s.do(db); err != nil {
			return fmt.Errorf("async: migrating %s (%s): %w", p.dialect.name, s.what, err)
		}
	}
	return nil
}

// schemaSteps lists what the schema lacks: tables, then columns and
// indexes of the models, then the dialect's extras (extraSteps).
func (p *Plugin) schemaSteps(db *gorm.DB) ([]schemaStep, error) {
	m := db.Migrator()
	var steps []schemaStep
	created := false
	for _, model := range schemaModels {
		if !m.HasTable(model) {
			steps = append(steps, schemaStep{"create table", func(db *gorm.DB) error { return db.Migrator().CreateTable(model) }})
			created = true
			continue
		}
		stmt := &gorm.Statement{DB: db}
		if err := stmt.Parse(model); err != nil {
			return nil, err
		}
		table := stmt.Schema.Table
		for _, col := range stmt.Schema.DBNames {
			if !m.HasColumn(model, col) {
				steps = append(steps, schemaStep{"add column " + table + "." + col, func(db *gorm.DB) error { return db.Migrator().AddColumn(model, col) }})
			}
		}
		for _, ix := range stmt.Schema.ParseIndexes() {
			if !m.HasIndex(model, ix.Name) {
				steps = append(steps, schemaStep{"create index " + ix.Name, func(db *gorm.DB) error { return db.Migrator().CreateIndex(model, ix.Name) }})
			}
		}
	}
	if created {
		// The extras are found missing on the tables: once they exist.
		return append(steps, schemaStep{"indexes and triggers", func(db *gorm.DB) error {
			extras, err := p.dialect.extraSteps(db)
			if err != nil {
				return err
			}
			return p.apply(db, extras)
		}}), nil
	}
	extras, err := p.dialect.extraSteps(db)
	return append(steps, extras...), err
}
