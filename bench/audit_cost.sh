#!/usr/bin/env bash
# What the audits cost, and what a change did to it: clean runs of the
# Byzantine suite's manifests (bench/manifests/byzantine-single.yaml, 2
# stages × 1 replica, where the coordinator recomputes every audit, and
# bench/manifests/byzantine.yaml, 2 stages × 3 replicas, where replicas
# validate) with audits at their default rates on a base binary and on
# this one, and without audits (`auditRate: 0`, `contributionAuditRate:
# 0`) on this one; for each seed the three runs follow each other, so a
# change of the machine's load falls on all three alike. The cost is the
# wall time per step (each run's training wall time over its steps, from
# the launcher's summary: the workers' waits at the step barrier while
# audits are decided count). Every step's loss is compared bit for bit.
# Writes bench/results/audit-cost.md.
#
# Usage: bench/audit_cost.sh BASE_BIN [--seeds N] [--only single|uniform] [--out FILE]
#   BASE_BIN    the binary to compare with (e.g. built from an earlier commit
#               with `git worktree add` and `cargo build --release`)
#   --seeds N   seeds per layout (default 10)
# Environment: PIPEWRIGHT_BIN (this binary, prebuilt; skips the build),
# PIPEWRIGHT_BIN_COMMIT and BASE_COMMIT (the commits they were built from,
# for the report).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
[[ $# -ge 1 && -x $1 ]] || { echo "usage: $0 BASE_BIN [--seeds N] [--only single|uniform] [--out FILE]" >&2; exit 2; }
base_bin="$1"
shift
seeds=10
layouts="single uniform"
out="bench/results/audit-cost.md"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seeds) seeds="$2"; shift 2 ;;
        --only) layouts="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[[ $seeds -ge 1 ]] || { echo "--seeds must be 1 or more" >&2; exit 2; }
# shellcheck source=bench/lib.sh
source bench/lib.sh
prepare
commit="${PIPEWRIGHT_BIN_COMMIT:-$(git rev-parse --short HEAD)}"
base_commit="${BASE_COMMIT:-unknown}"
results="$work/results.txt"
: >"$results"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
started=$(date +%s)
for layout in $layouts; do
    case "$layout" in
        single) manifest=bench/manifests/byzantine-single.yaml ;;
        uniform) manifest=bench/manifests/byzantine.yaml ;;
        *) echo "unknown layout $layout (single or uniform)" >&2; exit 2 ;;
    esac
    for k in $(seq 1 "$seeds"); do
        audited="$work/$layout-$k.yaml" plain="$work/$layout-$k-plain.yaml"
        sed "s/seed: 1,/seed: $k,/" "$manifest" >"$audited"
        cp "$audited" "$plain"
        printf '  validation: {auditRate: 0, contributionAuditRate: 0}\n' >>"$plain"
        for v in base new none; do
            bin="$PIPEWRIGHT_BIN" man="$audited" run="$work/run-$layout-$k-$v"
            [[ $v == base ]] && bin="$base_bin"
            [[ $v == none ]] && man="$plain"
            rc=0
            timeout 180 "$bin" train --processes --quiet --threads 1 --out "$run" "$man" \
                >"$run.out" 2>&1 || rc=$?
            python3 - "$run/summary.json" "$layout" "$k" "$v" "$rc" >>"$results" <<'PY'
import json, sys
path, layout, seed, variant, rc = sys.argv[1:]
try:
    s = json.load(open(path))
    losses = s.get("losses") or [s["final_loss"]]
    print(layout, seed, variant, rc, s["seconds"] / s["steps"], ",".join(repr(l) for l in losses))
except (OSError, ValueError, KeyError):
    print(layout, seed, variant, rc, "nan", "nan")
PY
            echo "$layout seed $k $v: exit $rc" >&2
        done
    done
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
elapsed=$(($(date +%s) - started))
mkdir -p "$(dirname "$out")"
python3 - "$results" "$(machine)" "$commit" "$base_commit" "$load_before" "$load_after" "$elapsed" >"$out" <<'PY'
import math, statistics, sys
path, machine, commit, base, before, after, elapsed = sys.argv[1:]
rows = [l.split() for l in open(path)]
print("# What the audits cost: this binary against a base one")
print()
print("`bench/audit_cost.sh`: clean runs (40 steps, `--threads 1`, one process per shard, audits at")
print("the default `auditRate` 0.25 and `contributionAuditRate` 0.05) of")
print("`bench/manifests/byzantine-single.yaml` (2 stages × 1 replica: the coordinator recomputes each")
print("audited micro-batch with its whole step and replays the update) and")
print("`bench/manifests/byzantine.yaml` (2 stages × 3 replicas under `median`: replicas validate), seed")
print("k = `spec.training.seed`; for each seed the base binary with audits, this one with audits and")
print("this one without audits, one after the other. Wall time per step: the run's training wall")
print("time over its steps (the waits at the step barrier while audits are decided count).")
print()
print("| layout | seeds | base, audits | this, audits | no audits | base's cost | this one's cost | seed by seed (this) | losses equal |")
print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
for layout in ("single", "uniform"):
    by = {}
    for r in rows:
        if r[0] != layout or r[3] != "0" or r[4] == "nan":
            continue
        by.setdefault(int(r[1]), {})[r[2]] = (float(r[4]), r[5])
    seeds = sorted(k for k, v in by.items() if len(v) == 3)
    if not seeds:
        continue
    med = {v: statistics.median(by[k][v][0] for k in seeds) for v in ("base", "new", "none")}
    ratios = [by[k]["new"][0] / by[k]["none"][0] - 1 for k in seeds]
    equal = sum(len({by[k][v][1] for v in ("base", "new", "none")}) == 1 for k in seeds)
    name = {"single": "2 × 1", "uniform": "2 × 3"}[layout]
    pct = lambda a: f"{100 * (a / med['none'] - 1):+.1f}%"
    print(f"| {name} | {len(seeds)} | {med['base'] * 1e3:.1f} ms | {med['new'] * 1e3:.1f} ms | "
          f"{med['none'] * 1e3:.1f} ms | {pct(med['base'])} | {pct(med['new'])} | median "
          f"{100 * statistics.median(ratios):+.1f}%, {100 * min(ratios):+.1f}% to "
          f"{100 * max(ratios):+.1f}% | {equal} of {len(seeds)} |")
failed = [r for r in rows if r[3] != "0" or r[4] == "nan"]
print()
print(f"Runs that failed or left no summary: {len(failed)}" + (": " + ", ".join(
    f"{r[0]} seed {r[1]} {r[2]} (exit {r[3]})" for r in failed) if failed else "."))
print()
print(machine)
print(f"This binary: commit {commit}; base: commit {base}. Load average (1, 5, 15 min): {before} before, "
      f"{after} after; {int(elapsed) // 60} min {int(elapsed) % 60} s in all.")
PY
cat "$out"
