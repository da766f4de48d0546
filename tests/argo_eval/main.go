// Command argo-eval takes one measurement of each metric of an AnalysisTemplate the way an Argo
// Rollouts AnalysisRun does, so that tests/test_gate_argo.py can check what Argo makes of
// rollbackd's gate. It is only glue: every step below is a call into Argo Rollouts' own packages
// (github.com/argoproj/argo-rollouts, a published Go module fetched from the module proxy at build
// time; nothing of it is copied here). The version is v1.10.1: the latest, v1.10.2, differs from it
// only by "go 1.26.10" in its go.mod (same code, same CRDs), which the machine's Go 1.26.8 with
// GOTOOLCHAIN=local refuses to build.
//
//  1. the template file is decoded into Argo's v1alpha1.AnalysisTemplate (strictly: a field Argo
//     does not know is an error) and its metrics checked by utils/analysis.ValidateMetrics, the
//     check the controller applies before it runs them;
//  2. the AnalysisRun is built by utils/analysis.NewAnalysisRunFromTemplates with the -arg values
//     (what the rollout controller does with the Rollout's analysis args: template defaults,
//     overridden, every arg required), and each metric's {{args.NAME}} are substituted by
//     utils/analysis.ResolveMetricArgs;
//  3. each web metric is measured by metricproviders/webmetric's Provider.Run, with the HTTP client
//     and jsonPath parser of NewWebMetricHttpClient / NewWebMetricJsonParser: the real HTTP request
//     to the URL, the status check, the jsonPath, and successCondition / failureCondition evaluated
//     by utils/evaluate.
//
// Usage:
//
//	argo-eval -template FILE [-arg NAME=VALUE]... [-query QUERY]
//
// -query appends "?QUERY" to each resolved URL (the tests use it for the gate's ?codes=1, which an
// operator would write into the template's URL). Output on stdout, one JSON object:
//
//	{"measurements": [{"metric": NAME, "url": URL, "phase": PHASE, "value": VALUE, "message": MSG}]}
//
// where PHASE is Argo's measurement phase: Successful, Failed, Inconclusive or Error. A template
// Argo would refuse, or an arg it could not resolve, exits with status 2 and the reason on stderr.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"

	log "github.com/sirupsen/logrus"
	"sigs.k8s.io/yaml"

	"github.com/argoproj/argo-rollouts/metricproviders/webmetric"
	"github.com/argoproj/argo-rollouts/pkg/apis/rollouts/v1alpha1"
	analysisutil "github.com/argoproj/argo-rollouts/utils/analysis"
)

type measured struct {
	Metric  string `json:"metric"`
	URL     string `json:"url"`
	Phase   string `json:"phase"`
	Value   string `json:"value"`
	Message string `json:"message,omitempty"`
}

// argFlags collects repeated -arg NAME=VALUE flags as Argo arguments.
type argFlags []v1alpha1.Argument

func (a *argFlags) String() string { return fmt.Sprint(len(*a), " args") }

func (a *argFlags) Set(s string) error {
	name, value, ok := strings.Cut(s, "=")
	if !ok || name == "" {
		return fmt.Errorf("want NAME=VALUE, got %q", s)
	}
	*a = append(*a, v1alpha1.Argument{Name: name, Value: &value})
	return nil
}

func loadTemplate(path string) (*v1alpha1.AnalysisTemplate, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var template v1alpha1.AnalysisTemplate
	if err := yaml.UnmarshalStrict(raw, &template); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if template.Kind != "AnalysisTemplate" {
		return nil, fmt.Errorf("%s: kind %q, want AnalysisTemplate", path, template.Kind)
	}
	if err := analysisutil.ValidateMetrics(template.Spec.Metrics); err != nil {
		return nil, fmt.Errorf("%s: Argo refuses the metrics: %w", path, err)
	}
	return &template, nil
}

func measure(run *v1alpha1.AnalysisRun, query string) ([]measured, error) {
	out := []measured{}
	for _, metric := range run.Spec.Metrics {
		resolved, err := analysisutil.ResolveMetricArgs(metric, run.Spec.Args)
		if err != nil {
			return nil, fmt.Errorf("metric %s: %w", metric.Name, err)
		}
		if resolved.Provider.Web == nil {
			return nil, fmt.Errorf("metric %s: not a web metric", metric.Name)
		}
		if query != "" {
			resolved.Provider.Web.URL += "?" + query
		}
		client, err := webmetric.NewWebMetricHttpClient(*resolved)
		if err != nil {
			return nil, fmt.Errorf("metric %s: %w", metric.Name, err)
		}
		parser, err := webmetric.NewWebMetricJsonParser(*resolved)
		if err != nil {
			return nil, fmt.Errorf("metric %s: %w", metric.Name, err)
		}
		logCtx := log.WithField("metric", metric.Name)
		m := webmetric.NewWebMetricProvider(*logCtx, client, parser).Run(run, *resolved)
		out = append(out, measured{Metric: metric.Name, URL: resolved.Provider.Web.URL,
			Phase: string(m.Phase), Value: m.Value, Message: m.Message})
	}
	return out, nil
}

func main() {
	templatePath := flag.String("template", "", "AnalysisTemplate YAML file")
	query := flag.String("query", "", "appended to each resolved URL after '?'")
	var args argFlags
	flag.Var(&args, "arg", "NAME=VALUE: an argument, as a Rollout's analysis step passes it (repeatable)")
	flag.Parse()
	log.SetOutput(os.Stderr)

	fail := func(err error) {
		fmt.Fprintf(os.Stderr, "argo-eval: %v\n", err)
		os.Exit(2)
	}
	if *templatePath == "" || flag.NArg() > 0 {
		fail(fmt.Errorf("usage: argo-eval -template FILE [-arg NAME=VALUE]... [-query QUERY]"))
	}
	template, err := loadTemplate(*templatePath)
	if err != nil {
		fail(err)
	}
	run, err := analysisutil.NewAnalysisRunFromTemplates([]*v1alpha1.AnalysisTemplate{template}, nil,
		args, nil, nil, nil, nil, template.Name, "", "default")
	if err != nil {
		fail(err)
	}
	measurements, err := measure(run, *query)
	if err != nil {
		fail(err)
	}
	if err := json.NewEncoder(os.Stdout).Encode(map[string]any{"measurements": measurements}); err != nil {
		os.Exit(1)
	}
}
