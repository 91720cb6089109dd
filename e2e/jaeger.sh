#!/usr/bin/env bash
# Builds, once, the Jaeger all-in-one binary the end-to-end tests send
# traces to, from source with the local Go toolchain through the Go module
# proxy.
#
# The binary lands in ~/.cache/pipewright/jaeger-<version>/jaeger (override
# the root with PIPEWRIGHT_CACHE) and is reused while present. Prints the
# binary's path on its last line.
set -euo pipefail

version="${JAEGER_VERSION:-v1.75.0}"
root="${PIPEWRIGHT_CACHE:-$HOME/.cache/pipewright}"
dir="$root/jaeger-$version"
bin="$dir/jaeger"

if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi
# One build at a time; a second caller waits for the first and reuses it.
mkdir -p "$root"
exec 9>"$dir.lock"
flock 9
if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi
if ! command -v go >/dev/null; then
    echo "e2e/jaeger.sh: the Go toolchain (go) is not installed" >&2
    exit 3
fi

say() { printf '[e2e/jaeger] %s\n' "$*" >&2; }
started=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The module sources and the build cache live in the scratch directory and go
# with it: only the binaries are kept, so a build leaves gigabytes less on disk.
export GOTOOLCHAIN=local GOFLAGS="-trimpath -mod=mod -buildvcs=false -modcacherw" CGO_ENABLED=0
export GOMODCACHE="$work/gomod" GOCACHE="$work/gocache"
say "building github.com/jaegertracing/jaeger/cmd/jaeger@$version"
(
    cd "$work"
    go mod init pipewright.dev/e2e/jaeger >/dev/null 2>&1
    go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$version" >&2
    nice -n 10 go build -ldflags="-s -w" -o "$work/jaeger" github.com/jaegertracing/jaeger/cmd/jaeger
)
mkdir -p "$dir"
# Written under a temporary name and renamed: a present binary is whole.
mv "$work/jaeger" "$bin.partial"
mv "$bin.partial" "$bin"
say "built in $(($(date +%s) - started)) s: $bin"
echo "$bin"
