#!/usr/bin/env bash
# Routing by measured throughput against fixed lanes, with one slow worker.
# Trains bench/manifests/routing.yaml (2 stages × 2 replicas, one process
# each) under `routing: lanes` and `routing: throughput`, each with every
# worker at full speed and with stage 1 replica 1 made FACTOR times slower
# (`--slow-worker 1/1=FACTOR`), alternating the runs; reports the median
# steady-state step time and tokens/s of each, and the slow stage's
# micro-batch shares. Writes bench/results/routing.md.
#
# Usage: bench/routing.sh [--factor F] [--repeats N] [--out FILE]
# Environment: PIPEWRIGHT_BIN (a prebuilt binary; skips the build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
factor=3
repeats=3
out="bench/results/routing.md"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --factor) factor="$2"; shift 2 ;;
        --repeats) repeats="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=bench/lib.sh
source bench/lib.sh
prepare
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq 1 "$repeats"); do
    for routing in lanes throughput; do
        sed "s/routing: lanes/routing: $routing/" bench/manifests/routing.yaml >"$work/$routing.yaml"
        for slow in even slow; do
            args=()
            [[ "$slow" == slow ]] && args=(--slow-worker "1/1=$factor")
            run="$work/$routing-$slow-$i"
            "$PIPEWRIGHT_BIN" train --processes --quiet --threads 1 "${args[@]}" --out "$run" \
                "$work/$routing.yaml" >"$run.out" 2>"$run.err" || { cat "$run.err" >&2; exit 1; }
            echo "repeat $i: $routing, $slow workers done" >&2
        done
    done
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$work" "$repeats" "$factor" "$load_before" "$load_after" "$(machine)" >"$out" <<'PY'
import json, statistics, sys
work, repeats, factor, before, after, machine = sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:]
tokens_per_step = 2 * 4 * 4 * 64
rows, secs = {}, {}
for routing in ("lanes", "throughput"):
    for slow in ("even", "slow"):
        runs = [json.load(open(f"{work}/{routing}-{slow}-{i}/summary.json")) for i in range(1, repeats + 1)]
        s = [r["step_seconds_measured"] for r in runs]
        secs[routing, slow] = statistics.median(s)
        rows[routing, slow] = (s, runs[-1]["micro_batches_per_replica"], runs[-1]["final_loss"])
print("# Routing micro-batches by measured throughput (SWARM-style) against fixed lanes")
print()
print("`bench/manifests/routing.yaml`: 2 stages × 2 replicas, one process each (`--threads 1`),")
print(f"8 micro-batches of 4 × 64 tokens per step, 40 steps; `slow`: stage 1 replica 1 runs every")
print(f"forward and backward {factor}× as long (`--slow-worker 1/1={factor}`). Steady-state step time is the")
print(f"slowest worker's mean wall time per step, the first step left out; median of {repeats} alternating runs.")
print()
print("| routing | workers | step ms | tokens/s | stage-1 micro-batches per replica (last step) | final loss |")
print("|---|---|---:|---:|---|---:|")
for (routing, slow), (s, shares, loss) in rows.items():
    t = secs[routing, slow]
    print(f"| {routing} | {slow} | {t*1e3:.1f} | {tokens_per_step / t:,.0f} | {shares[1]} | {loss:.4f} |")
print()
gain = secs["lanes", "slow"] / secs["throughput", "slow"]
cost = secs["throughput", "even"] / secs["lanes", "even"]
print(f"With one worker {factor}× slower, throughput routing runs **{gain:.2f}×** as fast as lanes. "
      f"With even workers its steps take {cost:.2f}× as long as lanes'.")
print()
print("Per run, step ms: " + "; ".join(f"{r}/{w} " + ", ".join(f"{x*1e3:.1f}" for x in s) for (r, w), (s, _, _) in rows.items()) + ".")
print()
print(machine)
print(f"Load average (1, 5, 15 min): {before} before, {after} after.")
PY
cat "$out"
