package async

import (
	"database/sql"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// MariaDB's compound statements carry the library's arguments as literals:
// each kind the hot path passes is written so that the server reads back
// exactly the value bound arguments would give, whatever the sql_mode.
func TestMariaInlineWritesLiterals(t *testing.T) {
	tokyo := time.FixedZone("JST", 9*3600)
	m := &mariaTxns{loc: tokyo}
	at := time.Date(2026, 11, 27, 20, 7, 8, 921456789, time.UTC)
	cases := []struct {
		q    string
		args []any
		want string
	}{
		{"SELECT ? , ?, ?", []any{int64(-5), 7, uint64(9)}, "SELECT -5 , 7, 9"},
		{"x = ?", []any{"it's a \\ \"test\" ünïcode"}, "x = _utf8mb4 X'" + hexOf("it's a \\ \"test\" ünïcode") + "'"},
		{"x = ?", []any{""}, "x = _utf8mb4 X''"},
		{"x = ?", []any{[]byte{0, 1, 0xff}}, "x = X'0001ff'"},
		{"x = ?", []any{nil}, "x = NULL"},
		{"x = ?", []any{(*time.Time)(nil)}, "x = NULL"},
		{"x = ?", []any{true}, "x = 1"},
		// In the driver's time zone, microseconds kept (the driver sends no finer).
		{"x = ?", []any{at}, "x = '2026-11-28 05:07:08.921456'"},
		{"x = ?", []any{&at}, "x = '2026-11-28 05:07:08.921456'"},
		{"x = ?", []any{sql.NullString{String: "a", Valid: true}}, "x = _utf8mb4 X'61'"},
		{"x = ?", []any{sql.NullInt64{}}, "x = NULL"},
	}
	for _, c := range cases {
		got, err := m.inline(c.q, c.args)
		require.NoError(t, err, c.q)
		assert.Equal(t, c.want, got)
	}

	_, err := m.inline("a = ? AND b = ?", []any{1})
	assert.ErrorContains(t, err, "1 arguments for 2 placeholders")
	_, err = m.inline("a = ?", []any{3.5})
	assert.True(t, errors.Is(err, errNotInlinable), "a float is not written in: %v", err)
	_, err = m.inline("a = ?", []any{strings.Repeat("x", mariaMaxInline)})
	assert.True(t, errors.Is(err, errNotInlinable), "an argument past the size limit is bound instead: %v", err)
}

func hexOf(s string) string {
	const digits = "0123456789abcdef"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		b.WriteByte(digits[s[i]>>4])
		b.WriteByte(digits[s[i]&15])
	}
	return b.String()
}
