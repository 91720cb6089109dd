#!/usr/bin/env bash
# Benchmark 4: recovery from kill -9. Trains bench/manifests/recovery.yaml
# (2 stages × 2 replicas, one process each) once undisturbed and once with
# `--kill-workers 10` (seeded SIGKILLs of random workers at random steps),
# then reports the median and worst time from a kill to the next completed
# step, and the final losses of both runs. Writes bench/results/recovery.md.
#
# Usage: bench/recovery.sh [--seed S] [--out FILE]
# Environment: PIPEWRIGHT_BIN (a prebuilt binary; skips the build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seed=1
out="bench/results/recovery.md"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seed) seed="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=bench/lib.sh
source bench/lib.sh
prepare
"$PIPEWRIGHT_BIN" train --processes --quiet --threads 1 --out "$work/clean" \
    bench/manifests/recovery.yaml >"$work/clean.out" 2>"$work/clean.err" || { cat "$work/clean.err" >&2; exit 1; }
"$PIPEWRIGHT_BIN" train --processes --quiet --threads 1 --out "$work/drill" \
    --kill-workers 10 --kill-seed "$seed" \
    bench/manifests/recovery.yaml >"$work/drill.out" 2>"$work/drill.err" || { cat "$work/drill.err" >&2; exit 1; }
report="$(python3 - "$work/clean/summary.json" "$work/drill/summary.json" <<'PY'
import json, statistics, sys
clean = json.load(open(sys.argv[1]))
drill = json.load(open(sys.argv[2]))
rec = sorted(drill["recovery_seconds"])
a, b = clean["final_loss"], drill["final_loss"]
diff = max(abs(x - y) for x, y in zip(clean["losses"], drill["losses"]))
print(f"kills={drill['kills']} recovered={len(rec)} median={statistics.median(rec):.3f} "
      f"max={rec[-1]:.3f} clean_loss={a:.6f} drill_loss={b:.6f} rel={abs(a-b)/abs(a):.2e} "
      f"max_step_diff={diff:.2e} reassignments={drill['reassignments']} "
      f"clean_s={clean['seconds']:.1f} drill_s={drill['seconds']:.1f} all={' '.join(f'{x:.3f}' for x in rec)}")
PY
)"
echo "$report"
kv() { sed -E "s/.*$1=([^ ]+).*/\1/" <<<"$report"; }
{
    echo "# Recovery from kill -9 (benchmark 4)"
    echo
    echo "2 stages × 2 replicas (5 processes with the coordinator), 300 steps; 10 workers"
    echo "killed with SIGKILL at seeded random steps (seed $seed). Recovery = from the kill"
    echo "to the next step every worker completed (the coordinator's barrier)."
    machine
    echo
    echo "| | value |"
    echo "|---|---:|"
    echo "| kills / recovered | $(kv kills) / $(kv recovered) |"
    echo "| recovery median | $(kv median) s |"
    echo "| recovery worst | $(kv max) s |"
    echo "| final loss, undisturbed | $(kv clean_loss) |"
    echo "| final loss, with kills | $(kv drill_loss) |"
    echo "| relative difference | $(kv rel) |"
    echo "| largest per-step loss difference | $(kv max_step_diff) |"
    echo "| wall time undisturbed / with kills | $(kv clean_s) s / $(kv drill_s) s |"
    echo
    echo "Goal: median ≤ 3 s; final loss within 1%."
} >"$out"
echo "-> $out"
