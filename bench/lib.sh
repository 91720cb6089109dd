# Shared set-up of the benchmark scripts (sourced, not run).
# prepare: installs the system packages the corpus needs, builds the release
# binary unless PIPEWRIGHT_BIN names one, and makes a scratch directory
# $work that is removed on exit.
prepare() {
    bash scripts/system-deps.sh >/dev/null
    if [[ -z "${PIPEWRIGHT_BIN:-}" ]]; then
        cargo build --release -q -p pipewright
        PIPEWRIGHT_BIN="$root/target/release/pipewright"
    fi
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
}

# machine: one line describing this machine, for the reports.
machine() {
    echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%Y-%m-%d)."
}
