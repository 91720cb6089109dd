#!/usr/bin/env bash
# Stage-link codecs side by side: trains bench/manifests/codecs.yaml (3 stages,
# one process each) with pipeline.codec = f32, f16, bf16 and int8 in turn and
# reports, for each, the bytes sent between stages per training token
# (measured on the links: activations forward, gradients backward, targets,
# norms, frame headers) and the loss at the same step. Writes
# bench/results/codecs.md.
#
# Usage: bench/codecs.sh [--out FILE]
# Environment: PIPEWRIGHT_BIN (a prebuilt binary; skips the build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="bench/results/codecs.md"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=bench/lib.sh
source bench/lib.sh
prepare
rows=""
for codec in f32 f16 bf16 int8; do
    sed "s/codec: f32/codec: $codec/" bench/manifests/codecs.yaml >"$work/$codec.yaml"
    "$PIPEWRIGHT_BIN" train --processes --quiet --threads 1 --out "$work/$codec" \
        "$work/$codec.yaml" >"$work/$codec.out" 2>"$work/$codec.err" || { cat "$work/$codec.err" >&2; exit 1; }
    row="$(python3 - "$work/$codec/summary.json" "$codec" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
tail = s["losses"][-10:]
print(f"| {sys.argv[2]} | {s['link_bytes_per_token']:.0f} | {sum(tail)/len(tail):.4f} | {s['val_bits_per_byte']:.3f} |")
PY
)"
    echo "$row"
    rows+="$row"$'\n'
done
{
    echo "# Stage-link codecs"
    echo
    echo "3 stages (2 boundaries), dim 128, 150 steps of 4 × 8 × 128 tokens, same seed."
    echo "Bytes per token: everything the stages sent each other, measured on the links."
    machine
    echo
    echo "| codec | link bytes / token | train loss (last 10 steps) | val bits/byte |"
    echo "|---|---:|---:|---:|"
    printf '%s' "$rows"
} >"$out"
echo "-> $out"
