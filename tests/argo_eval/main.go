// Command argo-eval judges HTTP answers the way Argo Rollouts' web metric provider does, so that
// tests/test_gate_argo.py can evaluate rollbackd's gate answers with the conditions of
// deploy/argo/analysis-template.yaml exactly as Argo would, with Argo's own libraries.
//
// The code below is a copy (Apache-2.0, The Argo Authors) of
//   - metricproviders/webmetric/webmetric.go: Run's status check, parseResponse, getValue
//   - utils/evaluate/evaluate.go: EvaluateResult, EvalCondition and the functions of its env
// in the two versions that differ in what matters here:
//   - "v1.9.1", the latest release: conditions evaluated by github.com/antonmedv/expr v1.15.5;
//     a 2xx body that is not JSON is Successful without evaluating anything.
//   - "main" (commit 9f8d111d8f8e): github.com/expr-lang/expr v1.17.8; a body that is not JSON
//     is evaluated as a string.
// Both parse jsonPath with k8s.io/client-go/util/jsonpath (empty means "{$}").
//
// Input on stdin: {"jsonPath": "...", "successCondition": "...", "failureCondition": "...",
// "answers": [{"status": 200, "body": "..."}, ...]}. Output on stdout: {"v1.9.1": [...],
// "main": [...]}, one {"phase", "value", "error"} per answer; phase is one of Argo's
// Successful, Failed, Inconclusive, Error.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"reflect"
	"strconv"

	antonmedv "github.com/antonmedv/expr"
	exprlang "github.com/expr-lang/expr"
	"k8s.io/client-go/util/jsonpath"
)

type request struct {
	JSONPath         string   `json:"jsonPath"`
	SuccessCondition string   `json:"successCondition"`
	FailureCondition string   `json:"failureCondition"`
	Answers          []answer `json:"answers"`
}

type answer struct {
	Status int    `json:"status"`
	Body   string `json:"body"`
}

type measurement struct {
	Phase string `json:"phase"`
	Value string `json:"value"`
	Error string `json:"error,omitempty"`
}

// compileRun compiles condition against env and runs it, with one version's expr library.
type compileRun func(condition string, env map[string]any) (any, error)

func runAntonmedv(condition string, env map[string]any) (any, error) {
	program, err := antonmedv.Compile(condition, antonmedv.Env(env))
	if err != nil {
		return nil, err
	}
	return antonmedv.Run(program, env)
}

func runExprLang(condition string, env map[string]any) (any, error) {
	program, err := exprlang.Compile(condition, exprlang.Env(env))
	if err != nil {
		return nil, err
	}
	return exprlang.Run(program, env)
}

type argo struct {
	eval             compileRun
	evalNonJSONBody  bool // main evaluates a non-JSON body as a string; v1.9.1 calls it Successful
	successCondition string
	failureCondition string
	parser           *jsonpath.JSONPath
}

// measure is webmetric.Provider.Run after the request: the status check, then parseResponse.
func (a argo) measure(ans answer) measurement {
	if ans.Status < 200 || ans.Status >= 300 {
		return measurement{Phase: "Error", Error: fmt.Sprintf("received non 2xx response code: %v", ans.Status)}
	}
	value, phase, err := a.parseResponse([]byte(ans.Body))
	if err != nil {
		return measurement{Phase: "Error", Value: value, Error: err.Error()}
	}
	return measurement{Phase: phase, Value: value}
}

func (a argo) parseResponse(bodyBytes []byte) (string, string, error) {
	var data any
	err := json.Unmarshal(bodyBytes, &data)
	if err != nil {
		bodyStr := string(bodyBytes)
		if !a.evalNonJSONBody {
			return bodyStr, "Successful", nil
		}
		phase, evalErr := a.evaluateResult(bodyStr)
		return bodyStr, phase, evalErr
	}
	fullResults, err := a.parser.FindResults(data)
	if err != nil {
		return "", "Error", fmt.Errorf("Could not find JSONPath in body: %s", err)
	}
	val, valString, err := getValue(fullResults)
	if err != nil {
		return "", "Error", err
	}
	phase, err := a.evaluateResult(val)
	return valString, phase, err
}

func getValue(fullResults [][]reflect.Value) (any, string, error) {
	for _, results := range fullResults {
		for _, r := range results {
			val := r.Interface()
			valBytes, err := json.Marshal(val)
			return val, string(valBytes), err
		}
	}
	return nil, "", errors.New("result of web metric produced no value")
}

// evaluateResult is evaluate.EvaluateResult.
func (a argo) evaluateResult(result any) (string, error) {
	successCondition, failCondition := false, false
	var err error
	if a.successCondition != "" {
		successCondition, err = a.evalCondition(result, a.successCondition)
		if err != nil {
			return "Error", fmt.Errorf("could not evaluate successCondition %q: %w", a.successCondition, err)
		}
	}
	if a.failureCondition != "" {
		failCondition, err = a.evalCondition(result, a.failureCondition)
		if err != nil {
			return "Error", fmt.Errorf("could not evaluate failureCondition %q: %w", a.failureCondition, err)
		}
	}
	switch {
	case a.successCondition == "" && a.failureCondition == "":
		return "Successful", nil
	case a.successCondition != "" && a.failureCondition == "":
		failCondition = !successCondition
	case a.successCondition == "" && a.failureCondition != "":
		successCondition = !failCondition
	}
	if failCondition {
		return "Failed", nil
	}
	if !failCondition && !successCondition {
		return "Inconclusive", nil
	}
	return "Successful", nil
}

// evalCondition is evaluate.EvalCondition: the same env, `result` bound to the jsonPath's value.
func (a argo) evalCondition(resultValue any, condition string) (bool, error) {
	env := map[string]any{
		"result":  valueFromPointer(resultValue),
		"asInt":   asInt,
		"asFloat": asFloat,
		"isNaN":   math.IsNaN,
		"isInf":   isInf,
		"isNil":   isNilFunc(resultValue),
		"default": defaultFunc(resultValue),
	}
	output, err := a.eval(condition, env)
	if err != nil {
		return false, err
	}
	switch val := output.(type) {
	case bool:
		return val, nil
	default:
		return false, fmt.Errorf("expected bool, but got %T", val)
	}
}

func isInf(f float64) bool { return math.IsInf(f, 0) }

func asInt(in any) int64 {
	switch i := in.(type) {
	case float64:
		return int64(i)
	case int64:
		return i
	case int:
		return int64(i)
	case string:
		inAsInt, err := strconv.ParseInt(i, 10, 64)
		if err == nil {
			return inAsInt
		}
		panic(err)
	}
	panic(fmt.Sprintf("asInt() not supported on %v %v", reflect.TypeOf(in), in))
}

func asFloat(in any) float64 {
	switch i := in.(type) {
	case float64:
		return i
	case int64:
		return float64(i)
	case int:
		return float64(i)
	case string:
		inAsFloat, err := strconv.ParseFloat(i, 64)
		if err == nil {
			return inAsFloat
		}
		panic(err)
	}
	panic(fmt.Sprintf("asFloat() not supported on %v %v", reflect.TypeOf(in), in))
}

func defaultFunc(resultValue any) func(any, any) any {
	return func(_ any, defaultValue any) any {
		if isNil(resultValue) {
			return defaultValue
		}
		return valueFromPointer(resultValue)
	}
}

func isNilFunc(resultValue any) func(any) bool {
	return func(_ any) bool { return isNil(resultValue) }
}

func isNil(in any) bool {
	if in == nil {
		return true
	}
	switch reflect.TypeOf(in).Kind() {
	case reflect.Ptr, reflect.Map, reflect.Array, reflect.Chan, reflect.Slice:
		return reflect.ValueOf(in).IsNil()
	}
	return false
}

func valueFromPointer(in any) any {
	if isNil(in) {
		return nil
	}
	if reflect.TypeOf(in).Kind() != reflect.Ptr {
		return in
	}
	return reflect.ValueOf(in).Elem().Interface()
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintf(os.Stderr, "argo-eval: bad request: %v\n", err)
		os.Exit(2)
	}
	path := req.JSONPath
	if path == "" {
		path = "{$}"
	}
	parser := jsonpath.New("metrics") // webmetric.NewWebMetricJsonParser
	if err := parser.Parse(path); err != nil {
		fmt.Fprintf(os.Stderr, "argo-eval: bad jsonPath %q: %v\n", path, err)
		os.Exit(2)
	}
	versions := map[string]argo{
		"v1.9.1": {eval: runAntonmedv, evalNonJSONBody: false, parser: parser},
		"main":   {eval: runExprLang, evalNonJSONBody: true, parser: parser},
	}
	out := map[string][]measurement{}
	for name, a := range versions {
		a.successCondition, a.failureCondition = req.SuccessCondition, req.FailureCondition
		for _, ans := range req.Answers {
			out[name] = append(out[name], a.measure(ans))
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}
