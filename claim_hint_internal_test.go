package async

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestClaimHintsAgeAndBound: a hint serves for hintSpan after the last
// full read of its range (a read above the hint does not renew it), a
// negative span turns hints off, and the process keeps at most maxHints.
func TestClaimHintsAgeAndBound(t *testing.T) {
	var h claimHints
	k := hintKey{filter: "f", prio: 5, set: dueUnscheduled}
	_, ok := h.get(k)
	assert.False(t, ok, "no hint yet")

	h.put(k, &Job{ID: 10}, true)
	c, ok := h.get(k)
	require.True(t, ok)
	assert.Equal(t, int64(10), c.id)

	// A hinted read moves the hint on but keeps the full read's time.
	h.mu.Lock()
	full := time.Now().Add(-hintSpan / 2)
	h.m[k] = claimHint{id: 10, full: full}
	h.mu.Unlock()
	h.put(k, &Job{ID: 20}, false)
	c, ok = h.get(k)
	require.True(t, ok)
	assert.Equal(t, int64(20), c.id)
	assert.Equal(t, full, c.full, "a read above the hint is not a full read")

	h.mu.Lock()
	h.m[k] = claimHint{id: 20, full: time.Now().Add(-hintSpan)}
	h.mu.Unlock()
	_, ok = h.get(k)
	assert.False(t, ok, "an old hint makes the claim read the whole range")

	sched := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	ks := hintKey{filter: "f", prio: 5, set: dueScheduled}
	h.put(ks, &Job{ID: 7, Scheduled: &sched}, true)
	c, ok = h.get(ks)
	require.True(t, ok)
	cond, arg := hintCond(dueScheduled, c, false)
	assert.Equal(t, " AND j.scheduled >= ?", cond)
	assert.Equal(t, sched, arg)
	cond, _ = hintCond(dueScheduled, c, true)
	assert.Equal(t, " AND j.scheduled < ?", cond, "the read below is disjoint from the read above")
	cond, arg = hintCond(dueUnscheduled, claimHint{id: 20}, false)
	assert.Equal(t, " AND j.id > ?", cond)
	assert.Equal(t, int64(20), arg)
	cond, _ = hintCond(dueUnscheduled, claimHint{id: 20}, true)
	assert.Equal(t, " AND j.id <= ?", cond)

	h.setTop("f", 9)
	top, ok := h.top("f")
	require.True(t, ok)
	assert.Equal(t, 9, top)
	h.span = -1
	_, ok = h.top("f")
	assert.False(t, ok, "hints off")
	h.put(k, &Job{ID: 30}, true)
	_, ok = h.get(k)
	assert.False(t, ok, "hints off")
	h.span = 0

	for i := 0; i < 3*maxHints; i++ {
		h.put(hintKey{filter: "f", prio: i}, &Job{ID: 1}, true)
		h.setTop(string(rune('a'+i%26))+time.Duration(i).String(), i)
	}
	assert.LessOrEqual(t, len(h.m), maxHints)
	assert.LessOrEqual(t, len(h.tops), maxHints)
}

// TestHintNameSeparatesFilters: claims with different queues, name prefixes
// or partitions keep hints apart.
func TestHintNameSeparatesFilters(t *testing.T) {
	names := map[string]bool{}
	for _, f := range []claimFilter{
		{},
		{queues: []string{"a"}},
		{queues: []string{"a", "b"}},
		{queues: []string{"a\x00b"}},
		{prefix: "a"},
		{outOf: 2, which: 0},
		{outOf: 2, which: 1},
	} {
		names[f.hintName()] = true
	}
	assert.Len(t, names, 7)
}
