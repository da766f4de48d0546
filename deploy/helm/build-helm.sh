#!/usr/bin/env bash
# Builds Helm once from the Go module proxy and caches it under
# ~/.cache/rollbackd-tools/helm-<version>/helm; prints the binary's path on stdout.
#
# The ldflags are the ones Helm's own Makefile sets: without them `helm version` says "v3.21"
# and `helm template`/`helm lint` assume Kubernetes 1.20 (the chart asks for >= 1.25). The
# Kubernetes version is client-go's minor + 1.0 (v0.36.x -> 1.36), as in that Makefile.
#
# Usage: deploy/helm/build-helm.sh [VERSION]   (default v3.21.4; about 3-4 minutes on 2 cores)
set -euo pipefail

version="${1:-${HELM_VERSION:-v3.21.4}}"
dest="${ROLLBACKD_TOOLS:-$HOME/.cache/rollbackd-tools}/helm-$version"
if [ -x "$dest/helm" ]; then
  echo "$dest/helm"
  exit 0
fi
command -v go >/dev/null || { echo "build-helm: 'go' not found on PATH" >&2; exit 1; }
mkdir -p "$dest"
major="${version%%.*}"   # v3
mod="helm.sh/helm/$major"
gomod="$(go mod download -json "$mod@$version" | python3 -c 'import json, sys; print(json.load(sys.stdin)["GoMod"])')"
minor="$(awk '$1 == "k8s.io/client-go" {print $2}' "$gomod" | cut -d. -f2)"
[ -n "$minor" ] || { echo "build-helm: no k8s.io/client-go in $gomod" >&2; exit 1; }
ldflags="-s -w -X $mod/internal/version.version=$version -X $mod/internal/version.gitTreeState=clean"
for pkg in pkg/lint/rules pkg/chartutil; do
  ldflags+=" -X $mod/$pkg.k8sVersionMajor=1 -X $mod/$pkg.k8sVersionMinor=$minor"
done
GOBIN="$dest" CGO_ENABLED=0 GOFLAGS=-buildvcs=false go install -trimpath -ldflags "$ldflags" "$mod/cmd/helm@$version" >&2
echo "$dest/helm"
