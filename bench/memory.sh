#!/usr/bin/env bash
# Memory: a model too large for one process trains when its stages are
# split over processes that each fit. Every stage worker runs under a
# per-process memory limit (`prlimit --data`, RLIMIT_DATA: the private
# writable memory a process may map). For S = 1, 2 and 4 stages it trains
# the largest model of one family (dim 1024, SwiGLU 2816, 16 heads) whose
# every shard process fits under the limit by the plan, and whose S shards
# fit this machine's memory by the plan: a coordinator plus S
# `pipewright worker` processes, with training.recompute none and full,
# and the workers' snapshot one step back where --snapshot says (disk by
# default: a file in each worker's TMPDIR, here the bench's scratch
# directory on disk). Reports each stage's planned bytes against its
# measured peak resident set (VmHWM) and peak mapped data (VmData, what
# RLIMIT_DATA limits), both polled, and the run's tokens/s (over the steps
# after the first, timed from the coordinator's status), and whether the
# single-process run of the S = 4 model is refused by the plan under the
# same limit. Then the cost of the disk snapshot: the largest S = 4 model
# whose snapshot fits in memory, trained with its snapshot in memory and
# on disk. Writes bench/results/memory.md.
#
# A model fits when its plan plus the process overhead, 10% more, is under
# the limit (the limit also counts address space the allocator reserves
# ahead of use), and its S shards' plans are under 85% of this machine's
# memory (MemTotal).
#
# Usage: bench/memory.sh [--limit SIZE] [--steps N] [--snapshot memory|disk]
#                        [--layers "L1 L2 L4"] [--no-cost] [--out FILE]
#   --layers: train these layer counts for S = 1, 2, 4 instead of the
#   largest that fit (the same models as an earlier run, say).
# Environment: PIPEWRIGHT_BIN (a prebuilt binary; skips the build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
limit="5.5GiB"
steps=3
snapshot="disk"
fixed_layers=""
cost=1
out="bench/results/memory.md"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --limit) limit="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        --snapshot) snapshot="$2"; shift 2 ;;
        --layers) fixed_layers="$2"; shift 2 ;;
        --no-cost) cost=0; shift ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=bench/lib.sh
source bench/lib.sh
prepare
started=$(date +%s)
load_at_start="$(cut -d' ' -f1-3 /proc/loadavg)"
limit_bytes="$(python3 -c '
import re, sys
m = re.fullmatch(r"([0-9.]+)\s*(|B|KiB|MiB|GiB|TiB)", sys.argv[1].strip())
if not m: sys.exit("--limit: expected a size such as 6GiB, got " + repr(sys.argv[1]))
scale = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}[m.group(2)]
print(int(float(m.group(1)) * scale))' "$limit")"
total_kib="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
threads_total="$(nproc)"
corpus="/usr/share/games/fortunes"

# manifest FILE STAGES LAYERS RECOMPUTE [SNAPSHOT]
manifest() {
    cat >"$1" <<EOF
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {name: memory-s$2}
spec:
  model: {dim: 1024, layers: $3, heads: 16, ffnDim: 2816, seqLen: 64}
  data:
    sources: ["$corpus"]
    exclude: ["*.dat", "*.u8"]
  training: {steps: $steps, microBatchSize: 1, microBatches: 4, learningRate: 0.0003, warmupSteps: 0, seed: 1, evalBatches: 1, recompute: $4, snapshot: ${5:-$snapshot}}
  pipeline: {stages: $2, replicas: 1, schedule: 1f1b}
  checkpoint: {keep: 1}
EOF
}

# plan_json FILE: the plan as JSON.
plan_json() { "$PIPEWRIGHT_BIN" plan --json "$1"; }

# shard_needs FILE: the plan's largest stage total plus the process
# overhead (32 MiB, plan::PROCESS_OVERHEAD_BYTES), and the sum over stages.
shard_needs() {
    plan_json "$1" | python3 -c '
import json, sys
p = json.load(sys.stdin)["plan"]
t = [s["total_bytes"] + (32 << 20) for s in p["stages"]]
print(max(t), sum(t))'
}

# layers_for S [SNAPSHOT]: the most layers (a multiple of S) whose every
# shard's plan, 10% more, fits the limit and whose S shards' plans fit
# 85% of this machine's memory.
layers_for() {
    local s="$1" best=0 l largest all
    for ((l = s; l <= 160; l += s)); do
        manifest "$work/probe.yaml" "$s" "$l" none "${2:-$snapshot}"
        read -r largest all < <(shard_needs "$work/probe.yaml")
        if ((largest * 11 / 10 > limit_bytes || all > total_kib * 1024 * 85 / 100)); then
            break
        fi
        best="$l"
    done
    echo "$best"
}

# run_one S LAYERS RECOMPUTE [SNAPSHOT]: trains and appends one row per
# stage to $rows.
run_one() {
    local s="$1" layers="$2" policy="$3" snap="${4:-$snapshot}" dir="$work/s$1-$3-${4:-$snapshot}" port url
    mkdir -p "$dir/tmp"
    manifest "$dir/run.yaml" "$s" "$layers" "$policy" "$snap"
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    url="http://127.0.0.1:$port"
    PIPEWRIGHT_JOIN_TOKEN=bench "$PIPEWRIGHT_BIN" coordinator "$dir/run.yaml" \
        --listen "127.0.0.1:$port" --out "$dir/out" 2>"$dir/coordinator.log" &
    local coord=$!
    local threads=$((threads_total / s)); ((threads >= 1)) || threads=1
    local pids=() st
    for ((st = 0; st < s; st++)); do
        TMPDIR="$dir/tmp" PIPEWRIGHT_JOIN_TOKEN=bench prlimit --data="$limit_bytes" "$PIPEWRIGHT_BIN" worker "$dir/run.yaml" \
            --coordinator "$url" --stage "$st" --replica 0 --threads "$threads" \
            --identity "$dir/id-$st" >/dev/null 2>"$dir/worker-$st.log" &
        pids+=($!)
    done
    # Poll each worker's peak resident set and the coordinator's tokens/s
    # until every worker has exited.
    local peaks=() datas=() tps="" p i alive status step t1="" s1=0 tn="" sn=0 vm
    for ((st = 0; st < s; st++)); do peaks+=(0); datas+=(0); done
    while :; do
        alive=0
        for i in "${!pids[@]}"; do
            p="${pids[$i]}"
            if kill -0 "$p" 2>/dev/null; then
                alive=1
                hwm="$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)"
                ((${hwm:-0} > ${peaks[$i]})) && peaks[$i]="$hwm"
                vm="$(awk '/^VmData:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)"
                ((${vm:-0} > ${datas[$i]})) && datas[$i]="$vm"
            fi
        done
        status="$(curl -sf "$url/status" 2>/dev/null || true)"
        if [[ -n "$status" ]]; then
            # Steps after the first (which fills the buffers) are timed
            # from when the coordinator first shows them committed.
            step="$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["step"])' "$status")"
            if [[ -z "$t1" ]] && ((step >= 1)); then t1="$(date +%s.%N)"; s1="$step"; fi
            if [[ -z "$tn" ]] && ((step >= steps)); then tn="$(date +%s.%N)"; sn="$step"; fi
        fi
        ((alive)) || break
        sleep 0.25
    done
    if [[ -n "$t1" && -n "$tn" ]] && ((sn > s1)); then
        tps="$(python3 -c 'import sys; a = [float(x) for x in sys.argv[1:]]; print(a[0] * 256 / (a[2] - a[1]))' "$((sn - s1))" "$t1" "$tn")"
    fi
    local rc=0
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    kill "$coord" 2>/dev/null || true
    wait "$coord" 2>/dev/null || true
    if ((rc != 0)); then
        echo "S=$s recompute $policy snapshot $snap: a worker failed" >&2
        tail -n 20 "$dir"/worker-*.log >&2
        exit 1
    fi
    local plan
    plan="$(plan_json "$dir/run.yaml")"
    for ((st = 0; st < s; st++)); do
        rows+="$(python3 -c '
import json, sys
p = json.loads(sys.argv[1])["plan"]
st, peak_kib, tps, s, policy, data_kib, snap = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], int(sys.argv[7]), sys.argv[8]
stage = p["stages"][st]
planned = (stage["total_bytes"] + (32 << 20)) / 2**30
measured = peak_kib / 2**20
params = p["params"] / 1e9
tps = "%.1f" % float(tps) if tps else "-"
print("| %s | %.2fB | %s | %s | %d | %d..%d | %.2f | %.2f | %+.1f%% | %.2f | %s |" % (
    s, params, policy, snap, st, stage["layers"]["start"], stage["layers"]["end"],
    planned, measured, 100 * (planned - measured) / measured, data_kib / 2**20,
    tps if st == 0 else ""))
' "$plan" "$st" "${peaks[$st]}" "$tps" "$s" "$policy" "${datas[$st]}" "$snap")"$'\n'
    done
    echo "S=$s ($layers layers) recompute $policy snapshot $snap: peaks ${peaks[*]} KiB, mapped ${datas[*]} KiB, $tps tokens/s"
    last_tps="$tps"
    rm -rf "$dir/out" "$dir/tmp"
}

rows=""
last_tps=""
declare -A chosen
read -r -a fixed <<<"$fixed_layers"
for s in 1 2 4; do
    if ((${#fixed[@]} == 3)); then
        chosen[$s]="${fixed[$((s == 4 ? 2 : s - 1))]}"
    else
        chosen[$s]="$(layers_for "$s")"
    fi
    if ((chosen[$s] == 0)); then
        echo "no model of this family fits $limit per process on $s stage(s)" >&2
        exit 1
    fi
done
for s in 1 2 4; do
    for policy in none full; do
        run_one "$s" "${chosen[$s]}" "$policy"
    done
done
main_rows="$rows"

# The disk snapshot's cost: the largest S = 4 model whose snapshot fits in
# memory under the limit, trained with it in memory and on disk.
cost_rows=""
if ((cost)); then
    cost_layers="$(layers_for 4 memory)"
    rows=""
    for snap in memory disk; do
        run_one 4 "$cost_layers" none "$snap"
        cost_rows+="| $snap | $cost_layers | $(python3 -c 'import sys; print("%.1f" % float(sys.argv[1]) if sys.argv[1] else "-")' "$last_tps") |"$'\n'
    done
    cost_detail="$rows"
fi

# The S = 4 model in one process, under the same limit: refused by the plan.
manifest "$work/single.yaml" 4 "${chosen[4]}" none
single_rc=0
timeout 60 prlimit --data="$limit_bytes" "$PIPEWRIGHT_BIN" train --quiet --out "$work/single" \
    "$work/single.yaml" >/dev/null 2>"$work/single.err" || single_rc=$?
if ((single_rc == 0)); then
    refusal="not refused: it trained to its end in one process under the limit"
elif grep -q 'needs' "$work/single.err"; then
    refusal="$(grep -m1 'needs' "$work/single.err" | sed "s|$work/||g")"
elif ((single_rc == 124)); then
    refusal="not refused: the plan fits it in one process under the limit; it was training when stopped after 60 s ($(grep -o 'step [0-9]*/[0-9]*' "$work/single.err" | tail -n 1))"
else
    refusal="not refused by the plan; it failed: $(tail -n 1 "$work/single.err")"
fi
read -r params4 single_gib < <(plan_json "$work/single.yaml" | python3 -c '
import json, sys
p = json.load(sys.stdin)["plan"]
print("%.2f %.1f" % (p["params"] / 1e9, p["single_process_bytes"] / 2**30))')
elapsed=$(($(date +%s) - started))
{
    echo "# Memory: a model larger than one process trains over stages"
    echo
    echo "Every stage worker runs under \`prlimit --data=$limit\` (RLIMIT_DATA). For each"
    echo "number of stages S the largest model of one family (dim 1024, ffnDim 2816,"
    echo "16 heads, seqLen 64, byte vocabulary) whose every shard process's plan, 10%"
    echo "more, fits the limit and whose S shards' plans fit 85% of this machine's"
    echo "memory${fixed_layers:+ (here the layer counts were given: $fixed_layers)}. Snapshot one step back: $snapshot"
    echo "(\`spec.training.snapshot\`; on disk it is a file in the worker's TMPDIR, on the"
    echo "machine's disk here). The plan's stage total is weights, gradients, Adam"
    echo "moments, activations at the schedule's peak, allocator slack and, in memory,"
    echo "the snapshot; checkpoints are streamed from the tensors (no copy)."
    echo "1F1B, 4 micro-batches of 1 × 64 tokens, $steps steps; $threads_total kernel threads"
    echo "shared by the S workers. Planned = \`plan\`'s stage total plus the process"
    echo "overhead; measured = the worker's peak resident set (VmHWM); mapped = its"
    echo "peak data mapping (VmData, what the limit applies to). tokens/s: the steps"
    echo "after the first (256 tokens each), timed from the coordinator's status; the"
    echo "run also writes the checkpoint of its last step through the coordinator."
    machine
    echo "Commit: $(git rev-parse --short HEAD). Run time: ${elapsed}s. Load average at the start: $load_at_start"
    echo "(other work shares the cores, so tokens/s vary between runs)."
    echo
    echo "| S | params | recompute | snapshot | stage | layers | planned GiB | measured GiB | plan error | mapped GiB | tokens/s |"
    echo "|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|"
    printf '%s' "$main_rows"
    echo
    if ((cost)); then
        echo "The disk snapshot's cost: the largest S = 4 model whose snapshot fits in"
        echo "memory under the same limit, recompute none, its snapshot in memory and on disk"
        echo "(each worker writes its weights and moments, 12 bytes a parameter, every step):"
        echo
        echo "| snapshot | layers | tokens/s |"
        echo "|---|---:|---:|"
        printf '%s' "$cost_rows"
        echo
        echo "| S | params | recompute | snapshot | stage | layers | planned GiB | measured GiB | plan error | mapped GiB | tokens/s |"
        echo "|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|"
        printf '%s' "$cost_detail"
        echo
    fi
    echo "The S = 4 model ($params4 B parameters; one process needs $single_gib GiB by the plan)"
    echo "in one process under the same limit (\`pipewright train\` without \`--processes\`):"
    echo
    echo "> $refusal"
} >"$out"
echo "-> $out (${elapsed}s)"
