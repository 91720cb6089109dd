#!/usr/bin/env bash
# Stage-link codecs side by side: trains bench/manifests/codecs.yaml (3 stages,
# one process each) with pipeline.codec = f32, f16, bf16 and int8 in turn, then
# with the learned low-rank bottleneck (codec lowrank) at rank dim/8 and dim/32
# on an f32 and an f16 wire, and reports, for each, the bytes sent between
# stages per training token (measured on the links: activations forward,
# gradients backward, targets, norms, frame headers) and the loss at the same
# step. Writes bench/results/codecs.md.
#
# Usage: bench/codecs.sh [--out FILE] [--only NAME...]
#   --only  run just these rows (f32 f16 bf16 int8 lowrank-16 lowrank-16-f16
#           lowrank-4 lowrank-4-f16); the report then holds only those.
# Environment: PIPEWRIGHT_BIN (a prebuilt binary; skips the build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="bench/results/codecs.md"
# name -> the pipeline settings that replace `codec: f32` in the manifest
# (dim 128: rank 16 is dim/8, rank 4 is dim/32).
declare -A variants=(
    [f32]="codec: f32"
    [f16]="codec: f16"
    [bf16]="codec: bf16"
    [int8]="codec: int8"
    [lowrank-16]="codec: lowrank, lowrank: {rank: 16, wire: f32}"
    [lowrank-16-f16]="codec: lowrank, lowrank: {rank: 16, wire: f16}"
    [lowrank-4]="codec: lowrank, lowrank: {rank: 4, wire: f32}"
    [lowrank-4-f16]="codec: lowrank, lowrank: {rank: 4, wire: f16}"
)
names=(f32 f16 bf16 int8 lowrank-16 lowrank-16-f16 lowrank-4 lowrank-4-f16)
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --only)
            shift
            names=()
            while [[ $# -gt 0 && "$1" != --* ]]; do
                [[ -n "${variants[$1]:-}" ]] || { echo "unknown row $1" >&2; exit 2; }
                names+=("$1"); shift
            done ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=bench/lib.sh
source bench/lib.sh
prepare
rows=""
for name in "${names[@]}"; do
    sed "s/codec: f32/${variants[$name]}/" bench/manifests/codecs.yaml >"$work/$name.yaml"
    "$PIPEWRIGHT_BIN" train --processes --quiet --threads 1 --out "$work/$name" \
        "$work/$name.yaml" >"$work/$name.out" 2>"$work/$name.err" || { cat "$work/$name.err" >&2; exit 1; }
    row="$(python3 - "$work/$name/summary.json" "$name" <<'PY'
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
    echo "lowrank-R: the learned low-rank bottleneck of rank R (16 = dim/8, 4 = dim/32) at each"
    echo "boundary, on an f32 wire (-f16: a 16-bit wire); it changes the model, so its loss is"
    echo "that of a different architecture. Targets (4 bytes per token per boundary) and frame"
    echo "headers do not shrink with any codec."
    machine
    echo
    echo "| codec | link bytes / token | train loss (last 10 steps) | val bits/byte |"
    echo "|---|---:|---:|---:|"
    printf '%s' "$rows"
} >"$out"
echo "-> $out"
