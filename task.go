package async

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"runtime"
	"strings"
	"sync"

	"gorm.io/gorm"
)

// Kwargs holds keyword arguments. A task whose last parameter has this type
// receives the job's keyword arguments there.
type Kwargs map[string]any

// TaskOption configures a task at registration.
type TaskOption func(*task)

// WithRetryPolicy gives a task its own retry policy, in place of the plugin's.
func WithRetryPolicy(p RetryPolicy) TaskOption { return func(t *task) { t.retry = p } }

var (
	ctxType    = reflect.TypeOf((*context.Context)(nil)).Elem()
	dbType     = reflect.TypeOf((*gorm.DB)(nil))
	errType    = reflect.TypeOf((*error)(nil)).Elem()
	kwargsType = reflect.TypeOf(Kwargs(nil))
)

// task is a registered function with its decoded signature.
type task struct {
	name      string
	fn        reflect.Value
	params    []reflect.Type // positional parameters after ctx and tx
	hasKwargs bool
	hasResult bool
	retry     RetryPolicy
}

var registry = struct {
	sync.RWMutex
	byName map[string]*task
	byPC   map[uintptr]*task
}{byName: map[string]*task{}, byPC: map[uintptr]*task{}}

// Register registers fn under its fully qualified Go name (for example
// "github.com/acme/app/mail.Send") and returns that name. fn must be
// func(ctx context.Context, tx *gorm.DB, params...) error or
// func(ctx context.Context, tx *gorm.DB, params...) (R, error); params are any
// JSON-decodable types and an optional last parameter of type Kwargs receives
// keyword arguments.
func Register(fn any, opts ...TaskOption) (string, error) {
	name := funcName(fn)
	if name == "" {
		return "", errorf(ErrBadSignature, "%T is not a function", fn)
	}
	return name, RegisterAs(name, fn, opts...)
}

// MustRegister is Register that panics on error, for package initialisation.
func MustRegister(fn any, opts ...TaskOption) string {
	name, err := Register(fn, opts...)
	if err != nil {
		panic(err)
	}
	return name
}

// RegisterAs registers fn under the given name. Registering the same name
// again replaces the earlier function.
func RegisterAs(name string, fn any, opts ...TaskOption) error {
	if name == "" {
		return errorf(ErrBadSignature, "empty task name")
	}
	if len(name) > 191 {
		return errorf(ErrBadSignature, "task name %q is longer than 191 bytes", name)
	}
	t, err := newTask(name, fn)
	if err != nil {
		return err
	}
	for _, o := range opts {
		o(t)
	}
	registry.Lock()
	defer registry.Unlock()
	registry.byName[name] = t
	registry.byPC[t.fn.Pointer()] = t
	return nil
}

func newTask(name string, fn any) (*task, error) {
	v := reflect.ValueOf(fn)
	if fn == nil || v.Kind() != reflect.Func || v.IsNil() {
		return nil, errorf(ErrBadSignature, "task %s: %T is not a function", name, fn)
	}
	ft := v.Type()
	bad := func(why string) error {
		return errorf(ErrBadSignature, "task %s (%s): %s; want func(context.Context, *gorm.DB, params...) error or (R, error)", name, ft, why)
	}
	if ft.IsVariadic() {
		return nil, bad("variadic functions are not supported")
	}
	if ft.NumIn() < 2 || ft.In(0) != ctxType || ft.In(1) != dbType {
		return nil, bad("the first two parameters must be context.Context and *gorm.DB")
	}
	t := &task{name: name, fn: v}
	for i := 2; i < ft.NumIn(); i++ {
		p := ft.In(i)
		if p == kwargsType {
			if i != ft.NumIn()-1 {
				return nil, bad("async.Kwargs must be the last parameter")
			}
			t.hasKwargs = true
			continue
		}
		switch p.Kind() {
		case reflect.Func, reflect.Chan, reflect.UnsafePointer, reflect.Complex64, reflect.Complex128:
			return nil, bad(fmt.Sprintf("parameter %d has type %s, which JSON cannot carry", i-1, p))
		}
		t.params = append(t.params, p)
	}
	switch ft.NumOut() {
	case 1:
		if ft.Out(0) != errType {
			return nil, bad("the only result must be error")
		}
	case 2:
		if ft.Out(1) != errType {
			return nil, bad("the second result must be error")
		}
		t.hasResult = true
	default:
		return nil, bad("it must return error or (R, error)")
	}
	return t, nil
}

// funcName is the fully qualified Go name of a function value.
func funcName(fn any) string {
	v := reflect.ValueOf(fn)
	if fn == nil || v.Kind() != reflect.Func || v.IsNil() {
		return ""
	}
	f := runtime.FuncForPC(v.Pointer())
	if f == nil {
		return ""
	}
	return strings.TrimSuffix(f.Name(), "-fm")
}

func lookupTask(name string) *task {
	registry.RLock()
	defer registry.RUnlock()
	return registry.byName[name]
}

// resolveTask turns Schedule's task argument into a name and, when known in
// this process, the registered task.
func resolveTask(fn any) (string, *task, error) {
	switch f := fn.(type) {
	case nil:
		return "", nil, ErrNilTask
	case string:
		if f == "" {
			return "", nil, errorf(ErrNilTask, "empty task name")
		}
		if len(f) > 191 {
			// The column's size: Postgres and MySQL would refuse the row,
			// SQLite would keep it.
			return "", nil, errorf(ErrUnknownTask, "task name %.40q... is longer than 191 bytes", f)
		}
		return f, lookupTask(f), nil
	}
	v := reflect.ValueOf(fn)
	if v.Kind() != reflect.Func {
		return "", nil, errorf(ErrBadArguments, "task must be a registered function or a task name, not %T", fn)
	}
	if v.IsNil() {
		return "", nil, ErrNilTask
	}
	registry.RLock()
	t := registry.byPC[v.Pointer()]
	registry.RUnlock()
	if t == nil {
		return "", nil, errorf(ErrUnknownTask, "function %s is not registered (call async.Register first)", funcName(fn))
	}
	return t.name, t, nil
}

// checkArgs verifies, at Schedule time, that encoded arguments fit the task.
func (t *task) checkArgs(args []json.RawMessage, kwargs map[string]json.RawMessage) error {
	_, err := t.decodeArgs(nil, args, kwargs)
	return err
}

// decodeArgs decodes args into the task's parameter types and appends them
// to in.
func (t *task) decodeArgs(in []reflect.Value, args []json.RawMessage, kwargs map[string]json.RawMessage) ([]reflect.Value, error) {
	if len(args) != len(t.params) {
		return nil, errorf(ErrBadArguments, "task %s takes %d argument(s), got %d", t.name, len(t.params), len(args))
	}
	if len(kwargs) > 0 && !t.hasKwargs {
		return nil, errorf(ErrBadArguments, "task %s takes no keyword arguments (its last parameter is not async.Kwargs)", t.name)
	}
	for i, raw := range args {
		p := reflect.New(t.params[i])
		if err := json.Unmarshal(raw, p.Interface()); err != nil {
			return nil, errorf(ErrBadArguments, "task %s argument %d does not fit parameter type %s: %w", t.name, i+1, t.params[i], err)
		}
		in = append(in, p.Elem())
	}
	return in, nil
}

// call decodes the stored arguments and calls the function. It returns the
// JSON-encoded result.
func (t *task) call(ctx context.Context, tx *gorm.DB, argsJSON, kwargsJSON string) (result string, err error) {
	var args []json.RawMessage
	if err := json.Unmarshal([]byte(argsJSON), &args); err != nil {
		return "", errorf(ErrBadArguments, "task %s: stored args are not a JSON array: %w", t.name, err)
	}
	var kw map[string]json.RawMessage
	if kwargsJSON != "" && kwargsJSON != "{}" {
		if err := json.Unmarshal([]byte(kwargsJSON), &kw); err != nil {
			return "", errorf(ErrBadArguments, "task %s: stored kwargs are not a JSON object: %w", t.name, err)
		}
	}
	in := make([]reflect.Value, 2, len(t.params)+3)
	in[0], in[1] = reflect.ValueOf(ctx), reflect.ValueOf(tx)
	in, err = t.decodeArgs(in, args, kw)
	if err != nil {
		return "", err
	}
	if t.hasKwargs {
		k := Kwargs{}
		for key, raw := range kw {
			var v any
			if err := json.Unmarshal(raw, &v); err != nil {
				return "", errorf(ErrBadArguments, "task %s keyword %s: %w", t.name, key, err)
			}
			k[key] = v
		}
		in = append(in, reflect.ValueOf(k))
	}
	out := t.fn.Call(in)
	if e := out[len(out)-1]; !e.IsNil() {
		return "", e.Interface().(error)
	}
	if !t.hasResult {
		return "null", nil
	}
	b, err := json.Marshal(out[0].Interface())
	if err != nil {
		return "", errorf(ErrBadResult, "task %s: %w", t.name, err)
	}
	return string(b), nil
}
