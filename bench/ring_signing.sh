#!/usr/bin/env bash
# What signing and checking every gradient ring frame costs a step.
# Trains bench/manifests/aggregation.yaml (1 stage × 3 replicas, one process
# each) cut to a few steps, under `mean` (the ring all-reduce) and `median`
# (the gather), with two binaries side by side: BEFORE (ring frames
# unsigned) and AFTER (every ring frame signed by its author and checked by
# its receiver), alternating the runs; reports the median steady-state step
# time of each. Writes bench/results/ring-signing.md.
#
# Usage: PIPEWRIGHT_BIN_BEFORE=... PIPEWRIGHT_BIN=... bench/ring_signing.sh
#        [--repeats N] [--steps N] [--out FILE]
# Both binaries must be built with the same profile; the report says which.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
repeats=5
steps=10
out="bench/results/ring-signing.md"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --repeats) repeats="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
: "${PIPEWRIGHT_BIN_BEFORE:?the binary without signed ring frames}"
: "${PIPEWRIGHT_BIN:?the binary with signed ring frames}"
profile="${BENCH_PROFILE:-release}"
# shellcheck source=bench/lib.sh
source bench/lib.sh
prepare
commit="$(git rev-parse --short HEAD)"
rules=(mean median)
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq 1 "$repeats"); do
    for rule in "${rules[@]}"; do
        sed -e "s/aggregation: mean/aggregation: $rule/" -e "s/steps: 40/steps: $steps/" \
            bench/manifests/aggregation.yaml >"$work/$rule.yaml"
        for which in before after; do
            bin="$PIPEWRIGHT_BIN"
            [[ "$which" == before ]] && bin="$PIPEWRIGHT_BIN_BEFORE"
            run="$work/$rule-$which-$i"
            "$bin" train --processes --quiet --threads 1 --out "$run" \
                "$work/$rule.yaml" >"$run.out" 2>"$run.err" || { cat "$run.err" >&2; exit 1; }
            echo "repeat $i: $rule, $which done" >&2
        done
    done
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$work" "$repeats" "$steps" "$profile" "$load_before" "$load_after" "$(machine)" "$commit" >"$out" <<'PY'
import json, statistics, sys
work, repeats, steps, profile, before, after, machine, commit = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
rules = ["mean", "median"]
secs, loss, per_run = {}, {}, {}
for rule in rules:
    for which in ["before", "after"]:
        runs = [json.load(open(f"{work}/{rule}-{which}-{i}/summary.json"))
                for i in range(1, repeats + 1)]
        s = [r["step_seconds_measured"] for r in runs]
        secs[rule, which] = statistics.median(s)
        loss[rule, which] = runs[0]["final_loss"]
        per_run[rule, which] = s
print("# Signed gradient ring frames: cost per step")
print()
print(f"`bench/manifests/aggregation.yaml` cut to {steps} steps: 1 stage × 3 replicas, one process each")
print("(`--threads 1`), 12 micro-batches of 4 × 64 tokens per step, about 0.9 M parameters (3.4 MB of")
print("gradients per replica per step, in 6 buckets). *before*: ring frames unsigned; *after*: every")
print("ring frame signed by its author (Ed25519) and checked by its receiver against the author's key.")
print("Steady-state step time is the slowest worker's mean wall time per step, the first step left")
print(f"out; median of {repeats} alternating runs; both binaries built with the `{profile}` profile.")
print()
print("| aggregation | before, step ms | after, step ms | after / before | final loss before | after |")
print("|---|---:|---:|---:|---:|---:|")
for rule in rules:
    b, a = secs[rule, "before"], secs[rule, "after"]
    print(f"| {rule} | {b*1e3:.1f} | {a*1e3:.1f} | {a/b:.3f} | {loss[rule, 'before']:.4f} | {loss[rule, 'after']:.4f} |")
print()
print("Per run, step ms: " + "; ".join(f"{r}/{w} " + ", ".join(f"{x*1e3:.1f}" for x in s)
                                      for (r, w), s in per_run.items()) + ".")
print()
print(machine)
print(f"Commit {commit}. Load average (1, 5, 15 min): {before} before, {after} after.")
PY
cat "$out"
