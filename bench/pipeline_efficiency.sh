#!/usr/bin/env bash
# Benchmark 1: pipeline efficiency. Runs bench/manifests/pipeline_efficiency.yaml
# as a coordinator and two single-threaded stage processes (`pipewright train
# --processes --threads 1`) R times and compares the measured mean step time
# with the 1F1B schedule's theoretical bound computed from the stages'
# measured compute and update times (the launcher prints both). Writes
# bench/results/pipeline_efficiency.md.
#
# Usage: bench/pipeline_efficiency.sh [--repeats R] [--out FILE]
# Environment: PIPEWRIGHT_BIN (a prebuilt binary; skips the build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
repeats=3
out="bench/results/pipeline_efficiency.md"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --repeats) repeats="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=bench/lib.sh
source bench/lib.sh
prepare
rows=""
for i in $(seq 1 "$repeats"); do
    "$PIPEWRIGHT_BIN" train --processes --quiet --threads 1 --overwrite \
        --out "$work/run$i" bench/manifests/pipeline_efficiency.yaml >"$work/out$i" 2>"$work/err$i" || {
        cat "$work/err$i" >&2; exit 1; }
    line="$(grep 'pipeline efficiency' "$work/out$i")"
    pct="$(sed -E 's/.* ([0-9.]+)% of.*/\1/' <<<"$line")"
    meas="$(sed -E 's/.*\(([0-9.]+) ms per step measured.*/\1/' <<<"$line")"
    bound="$(sed -E 's/.*measured, ([0-9.]+) ms from.*/\1/' <<<"$line")"
    echo "run $i: $pct% ($meas ms measured, $bound ms bound)"
    rows+="| $i | $meas | $bound | $pct% |"$'\n'
done
median="$(grep -h 'pipeline efficiency' "$work"/out* | sed -E 's/.* ([0-9.]+)% of.*/\1/' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
{
    echo "# Pipeline efficiency (benchmark 1)"
    echo
    echo "2-stage 1F1B, 8 micro-batches of 4 × 128 tokens, quickstart model shapes,"
    echo "one kernel thread per stage process; bound = the schedule's theoretical"
    echo "step time from each stage's measured forward/backward and update time."
    machine
    echo
    echo "| run | measured ms/step | bound ms/step | efficiency |"
    echo "|---:|---:|---:|---:|"
    printf '%s' "$rows"
    echo
    echo "Median efficiency: **$median%** of the bound (goal ≥ 90%)."
} >"$out"
echo "median $median% -> $out"
