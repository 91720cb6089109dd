#!/usr/bin/env bash
# Builds, once, the Kubernetes control plane the end-to-end tests run against:
# kube-apiserver, kube-controller-manager, kube-scheduler and kubectl from
# k8s.io/kubernetes, etcd, kwok (fake nodes and pods) and helm, all from
# source with the local Go toolchain.
#
# The binaries land in ~/.cache/pipewright/k8s-<version>/bin (override the
# root with PIPEWRIGHT_CACHE). A stamp file, written last, records the exact
# versions; the build runs again only when the stamp is missing or differs.
# Prints the bin directory on its last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=e2e/versions.sh
source ./versions.sh

root="${PIPEWRIGHT_CACHE:-$HOME/.cache/pipewright}"
dir="$root/k8s-$KUBERNETES_VERSION"
bin="$dir/bin"
stamp="$dir/stamp"
# Bump `recipe` when the way the tools are built changes, to rebuild them.
recipe=2
want="recipe=$recipe kubernetes=$KUBERNETES_VERSION etcd=$ETCD_VERSION kwok=$KWOK_VERSION helm=$HELM_VERSION"

built() { [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; }
if built; then
    echo "$bin"
    exit 0
fi
# One build at a time; a second caller waits for the first and reuses it.
mkdir -p "$root"
exec 9>"$dir.lock"
flock 9
if built; then
    echo "$bin"
    exit 0
fi

if ! command -v go >/dev/null; then
    echo "e2e/build.sh: the Go toolchain (go) is not installed" >&2
    exit 3
fi

say() { printf '[e2e/build] %s\n' "$*" >&2; }
started=$(date +%s)
rm -rf "$dir"
mkdir -p "$bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The module sources and the build cache live in the scratch directory and go
# with it: only the binaries are kept, so a build leaves gigabytes less on disk.
export GOTOOLCHAIN=local GOFLAGS="-trimpath -mod=mod -buildvcs=false -modcacherw" CGO_ENABLED=0
export GOMODCACHE="$work/gomod" GOCACHE="$work/gocache"
ldflags="-s -w"
build() { nice -n 10 go build -ldflags="$ldflags" "$@"; }

# k8s.io/kubernetes points every k8s.io/* staging module at a directory of its
# own repository, and a dependency's `replace` lines do not apply to the
# module that requires it; so a wrapper module requires k8s.io/kubernetes and
# replaces each staging module with its published v0.X.Y release.
staging_version="v0.${KUBERNETES_VERSION#v1.}"
say "downloading k8s.io/kubernetes@$KUBERNETES_VERSION"
mkdir -p "$work/k8s"
(
    cd "$work/k8s"
    go mod init pipewright.dev/e2e/k8s >/dev/null 2>&1
    modfile=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
        sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
    go mod edit -require="k8s.io/kubernetes@$KUBERNETES_VERSION"
    # Lines like `k8s.io/api => ./staging/src/k8s.io/api`.
    modules=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/src/.*#\1#p' "$modfile")
    if [[ -z "$modules" ]]; then
        echo "e2e/build.sh: no staging modules found in $modfile" >&2
        exit 1
    fi
    for m in $modules; do
        go mod edit -replace="$m=$m@$staging_version"
    done
    # A release build stamps its version into the binaries; without it they
    # report v0.0.0 and clients checking the server version (helm's
    # kubeVersion) refuse it.
    minor=${KUBERNETES_VERSION#v1.}
    minor=${minor%%.*}
    stamp_version=""
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        stamp_version+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1"
        stamp_version+=" -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    say "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl"
    ldflags="$ldflags$stamp_version" build -o "$bin/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler \
        k8s.io/kubernetes/cmd/kubectl
)

# The etcd server module replaces its sibling modules (api, client, pkg) by
# relative paths the same way.
say "building etcd $ETCD_VERSION"
mkdir -p "$work/etcd"
(
    cd "$work/etcd"
    go mod init pipewright.dev/e2e/etcd >/dev/null 2>&1
    go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    for m in go.etcd.io/etcd/api/v3 go.etcd.io/etcd/client/pkg/v3 go.etcd.io/etcd/client/v3 \
        go.etcd.io/etcd/pkg/v3; do
        go mod edit -replace="$m=$m@$ETCD_VERSION"
    done
    build -o "$bin/etcd" go.etcd.io/etcd/server/v3
)

say "building kwok $KWOK_VERSION and helm $HELM_VERSION"
# `go install pkg@version` builds in module mode of its own; -mod is refused.
install() { GOBIN="$bin" GOFLAGS="-trimpath -buildvcs=false -modcacherw" nice -n 10 go install -ldflags="$ldflags" "$@"; }
install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"

for tool in kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm; do
    [[ -x "$bin/$tool" ]] || { echo "e2e/build.sh: $tool was not built" >&2; exit 1; }
done
echo "$want" >"$stamp"
say "built in $(($(date +%s) - started)) s into $bin ($(du -sh "$bin" | cut -f1))"
echo "$bin"
