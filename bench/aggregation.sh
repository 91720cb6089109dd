#!/usr/bin/env bash
# Robust gradient aggregation against the ring's mean, clean and attacked.
# Trains bench/manifests/aggregation.yaml (1 stage × 3 replicas, one process
# each) under every spec.pipeline.aggregation (mean, median, trimmedMean,
# centeredClip), each with every replica honest, with replica 1 sending 100
# times its gradient (`--byzantine 0/1=scale`) and with it sending −100
# times its gradient (`--byzantine 0/1=scale:-100`), alternating the runs;
# reports the median steady-state step time and the final loss of each.
# Writes bench/results/aggregation.md.
#
# Usage: bench/aggregation.sh [--repeats N] [--out FILE]
# Environment: PIPEWRIGHT_BIN (a prebuilt binary; skips the build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
repeats=2
out="bench/results/aggregation.md"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --repeats) repeats="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=bench/lib.sh
source bench/lib.sh
prepare
commit="$(git rev-parse --short HEAD)"
rules=(mean median trimmedMean centeredClip)
attacks=(none scale scale:-100)
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq 1 "$repeats"); do
    for rule in "${rules[@]}"; do
        sed "s/aggregation: mean/aggregation: $rule/" bench/manifests/aggregation.yaml >"$work/$rule.yaml"
        for attack in "${attacks[@]}"; do
            args=()
            [[ "$attack" != none ]] && args=(--byzantine "0/1=$attack")
            run="$work/$rule-${attack//:/}-$i"
            "$PIPEWRIGHT_BIN" train --processes --quiet --threads 1 "${args[@]}" --out "$run" \
                "$work/$rule.yaml" >"$run.out" 2>"$run.err" || { cat "$run.err" >&2; exit 1; }
            echo "repeat $i: $rule, attack $attack done" >&2
        done
    done
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$work" "$repeats" "$load_before" "$load_after" "$(machine)" "$commit" >"$out" <<'PY'
import json, statistics, sys
work, repeats, before, after, machine, commit = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
rules = ["mean", "median", "trimmedMean", "centeredClip"]
attacks = ["none", "scale", "scale:-100"]
tokens_per_step = 3 * 4 * 4 * 64
secs, loss, per_run = {}, {}, {}
for rule in rules:
    for attack in attacks:
        runs = [json.load(open(f"{work}/{rule}-{attack.replace(':', '')}-{i}/summary.json"))
                for i in range(1, repeats + 1)]
        s = [r["step_seconds_measured"] for r in runs]
        secs[rule, attack] = statistics.median(s)
        loss[rule, attack] = [r["final_loss"] for r in runs]
        per_run[rule, attack] = s
print("# Robust gradient aggregation against the ring's mean")
print()
print("`bench/manifests/aggregation.yaml`: 1 stage × 3 replicas, one process each (`--threads 1`),")
print("12 micro-batches of 4 × 64 tokens per step (4 per replica), 40 steps, about 0.9 M parameters")
print("(3.4 MB of gradients per replica per step). `scale`: replica 1 sends 100 times its gradient")
print("(`--byzantine 0/1=scale`); `scale:-100`: −100 times (`--byzantine 0/1=scale:-100`). `mean` is")
print("the ring all-reduce; the robust rules all-gather every replica's contribution and aggregate")
print("it on every replica (`docs/byzantine.md`). Steady-state step time is the slowest worker's mean")
print(f"wall time per step, the first step left out; median of {repeats} alternating runs. The loss is")
print("the last step's training loss (the same in every repeat: the runs are deterministic).")
print()
print("| aggregation | attacker | step ms | vs mean, clean | tokens/s | final loss |")
print("|---|---|---:|---:|---:|---:|")
base = secs["mean", "none"]
for rule in rules:
    for attack in attacks:
        t = secs[rule, attack]
        ls = loss[rule, attack]
        shown = f"{ls[0]:.4f}" if max(ls) - min(ls) < 1e-6 else " / ".join(f"{x:.4f}" for x in ls)
        print(f"| {rule} | {attack} | {t*1e3:.1f} | {t/base:.2f}× | {tokens_per_step / t:,.0f} | {shown} |")
print()
clean = loss["mean", "none"][0]
worst = max(abs(loss[r, a][0] - clean) for r in rules[1:] for a in attacks)
print(f"Clean mean: final loss {clean:.4f}. Under `scale:-100` the mean ends at "
      f"{loss['mean', 'scale:-100'][0]:.4f}; every robust rule, clean or attacked, ends within "
      f"{worst:.3f} of the clean mean.")
print()
print("Per run, step ms: " + "; ".join(f"{r}/{a} " + ", ".join(f"{x*1e3:.1f}" for x in s)
                                      for (r, a), s in per_run.items()) + ".")
print()
print(machine)
print(f"Commit {commit}. Load average (1, 5, 15 min): {before} before, {after} after.")
PY
cat "$out"
