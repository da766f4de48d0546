#!/usr/bin/env bash
# Builds kube-apiserver once from the Go module proxy and caches it under
# ~/.cache/rollbackd-k8s/<version>/kube-apiserver; prints the binary's path on stdout.
#
# k8s.io/kubernetes is not meant to be used as a module: its go.mod requires its staging modules
# (k8s.io/api, k8s.io/apiserver, ...) at v0.0.0 and replaces them with ./staging/src/..., which
# does not apply to a dependant. A throwaway module therefore requires k8s.io/kubernetes at a
# release and replaces every staging module with its published v0.<minor>.<patch> twin, read from
# the release's own replace block so the list never goes stale.
#
# Usage: tests/k8s/build-kube-apiserver.sh [VERSION]   (default $K8S_VERSION or 1.34.4)
# About 7-10 minutes on 2 cores the first time; then instant.
set -euo pipefail

version="${1:-${K8S_VERSION:-1.34.4}}"
cache_root="${ROLLBACKD_K8S_CACHE:-$HOME/.cache/rollbackd-k8s}"
dest_dir="$cache_root/$version"
bin="$dest_dir/kube-apiserver"
mkdir -p "$dest_dir"

# One build at a time: the harness and .ci/run may both ask for it.
exec 9>"$dest_dir/.build.lock"
flock 9
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "build-kube-apiserver: 'go' not found on PATH" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
export GOFLAGS="-mod=mod -buildvcs=false"
go mod init rollbackd-k8s-build >/dev/null 2>&1

gomod="$(go mod download -json "k8s.io/kubernetes@v$version" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["GoMod"])')"
staging="v0.${version#1.}"
# Lines such as "	k8s.io/api => ./staging/src/k8s.io/api" in the release's replace block.
mods="$(awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$gomod")"
[ -n "$mods" ] || { echo "build-kube-apiserver: no staging replaces in $gomod" >&2; exit 1; }
for m in $mods; do
  go mod edit -replace "$m=$m@$staging"
done
go get "k8s.io/kubernetes/cmd/kube-apiserver@v$version" >&2

ldflags="-s -w"
ldflags+=" -X k8s.io/component-base/version.gitVersion=v$version"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
ldflags+=" -X k8s.io/component-base/version.gitMinor=$(echo "$version" | cut -d. -f2)"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$bin.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2
mv "$bin.tmp" "$bin"
echo "$bin"
