module rollbackd.test/argo-eval

go 1.24.0

require (
	github.com/antonmedv/expr v1.15.5
	github.com/expr-lang/expr v1.17.8
	k8s.io/client-go v0.34.1
)
