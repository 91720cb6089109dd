#!/usr/bin/env bash
# Every test: formatting, lints, Rust unit and integration tests, the
# Hugging Face export tests in Python, the end-to-end suite on a real
# Kubernetes control plane (built from source once, cached in
# ~/.cache/pipewright), and the quickstart end to end.
# Set PIPEWRIGHT_SKIP_E2E=1 or PIPEWRIGHT_SKIP_QUICKSTART=1 to leave those out.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "system packages"
bash scripts/system-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --release --workspace --all-targets -- -D warnings

step "cargo clippy with the CUDA backend (builds without CUDA installed)"
cargo clippy --release -p pipewright --features cuda --all-targets -- -D warnings

step "cargo test"
cargo test --release --workspace

step "CUDA kernels compile for sm_90 with NVRTC (no GPU needed; device tests skip without one)"
NVRTC_LIB=$(bash scripts/nvrtc-env.sh | tail -1)
LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PIPEWRIGHT_REQUIRE_NVRTC=1 \
    cargo test --release -p pipewright --features cuda --test cuda_compile --test cuda_parity

step "python environment"
PY=$(bash scripts/python-env.sh | tail -1)

step "python tests (export to transformers, benchmark scripts)"
cargo build --release -p pipewright
PIPEWRIGHT_BIN="$PWD/target/release/pipewright" PIPEWRIGHT_REQUIRE_ALL=1 \
    "$PY" -m pytest -q -p no:cacheprovider tests/python

if [[ "${PIPEWRIGHT_SKIP_E2E:-0}" != 1 ]]; then
    step "end to end on Kubernetes (control plane built once into ~/.cache/pipewright)"
    bash e2e/run.sh
fi

if [[ "${PIPEWRIGHT_SKIP_QUICKSTART:-0}" != 1 ]]; then
    step "quickstart end to end"
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
    target/release/pipewright train examples/quickstart.yaml --quiet --out "$out/run"
    "$PY" - "$out/run/summary.json" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
bpb, uni = s["val_bits_per_byte"], s["unigram_bits_per_byte"]
print(f"quickstart: validation {bpb:.3f} bits/byte vs unigram {uni:.3f}")
assert s["finished"], "the quickstart did not finish"
assert bpb < uni - 1.0, f"model ({bpb:.3f}) not clearly below the unigram baseline ({uni:.3f})"
PYEOF
fi
printf '\nall tests passed\n'
