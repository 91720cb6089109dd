#!/usr/bin/env bash
# Memory: a model too large for one process trains when its stages are
# split over processes that each fit. Every stage worker runs under a
# per-process memory limit (`prlimit --data`, RLIMIT_DATA: the private
# writable memory a process may map). For S = 1, 2 and 4 stages it trains
# the largest model of one family (dim 1024, SwiGLU 2816, 16 heads) whose
# every shard process fits under the limit, and no larger than this
# machine's memory split S ways: a coordinator plus S `pipewright worker`
# processes, with training.recompute none and full. Reports each stage's
# planned bytes against its measured peak resident set (VmHWM, polled) and
# the run's tokens/s (over the steps after the first, timed from the
# coordinator's status),
# and whether the single-process run of the S = 4 model is refused by the
# plan under the same limit. Writes bench/results/memory.md.
#
# The plan's stage total counts what a shard process holds besides its
# training state: its snapshot of weights and Adam moments one step back
# and its checkpoint's bytes. The limit also counts address space the
# allocator reserves ahead of use, and the plan still misses some of a
# worker's buffers (the plan error column shows how much), so a model fits
# when plan + 8 x weights + 512 MiB is under the limit.
#
# Usage: bench/memory.sh [--limit SIZE] [--steps N] [--out FILE]
# Environment: PIPEWRIGHT_BIN (a prebuilt binary; skips the build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
limit="4GiB"
steps=4
out="bench/results/memory.md"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --limit) limit="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
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
available_kib="$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)"
threads_total="$(nproc)"
corpus="/usr/share/games/fortunes"

# manifest FILE STAGES LAYERS RECOMPUTE
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
  training: {steps: $steps, microBatchSize: 1, microBatches: 4, learningRate: 0.0003, warmupSteps: 0, seed: 1, evalBatches: 1, recompute: $4}
  pipeline: {stages: $2, replicas: 1, schedule: 1f1b}
  checkpoint: {keep: 1}
EOF
}

# plan_json FILE: the plan as JSON.
plan_json() { "$PIPEWRIGHT_BIN" plan --json "$1"; }

# largest_shard FILE: what the largest shard process may hold: the plan's
# stage total, the process overhead (32 MiB, plan::PROCESS_OVERHEAD_BYTES)
# and a margin of 8 x the weights for what the plan does not count yet.
largest_shard() {
    plan_json "$1" | python3 -c '
import json, sys
p = json.load(sys.stdin)["plan"]
print(max(s["total_bytes"] + 8 * s["weight_bytes"] for s in p["stages"]) + (32 << 20))'
}

# layers_for S: the most layers (a multiple of S) whose every shard fits
# 512 MiB under the limit and whose S shards fit this machine.
layers_for() {
    local s="$1" best=0 l need
    for ((l = s; l <= 96; l += s)); do
        manifest "$work/probe.yaml" "$s" "$l" none
        need="$(largest_shard "$work/probe.yaml")"
        if ((need + (512 << 20) > limit_bytes || need * s > available_kib * 1024 * 8 / 10)); then
            break
        fi
        best="$l"
    done
    echo "$best"
}

# run_one S LAYERS RECOMPUTE: trains and appends one row per stage to $rows.
run_one() {
    local s="$1" layers="$2" policy="$3" dir="$work/s$1-$3" port url
    mkdir -p "$dir"
    manifest "$dir/run.yaml" "$s" "$layers" "$policy"
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    url="http://127.0.0.1:$port"
    PIPEWRIGHT_JOIN_TOKEN=bench "$PIPEWRIGHT_BIN" coordinator "$dir/run.yaml" \
        --listen "127.0.0.1:$port" --out "$dir/out" 2>"$dir/coordinator.log" &
    local coord=$!
    local threads=$((threads_total / s)); ((threads >= 1)) || threads=1
    local pids=() st
    for ((st = 0; st < s; st++)); do
        PIPEWRIGHT_JOIN_TOKEN=bench prlimit --data="$limit_bytes" "$PIPEWRIGHT_BIN" worker "$dir/run.yaml" \
            --coordinator "$url" --stage "$st" --replica 0 --threads "$threads" \
            --identity "$dir/id-$st" >/dev/null 2>"$dir/worker-$st.log" &
        pids+=($!)
    done
    # Poll each worker's peak resident set and the coordinator's tokens/s
    # until every worker has exited.
    local peaks=() tps="" p i alive status step t1="" s1=0 tn="" sn=0
    for ((st = 0; st < s; st++)); do peaks+=(0); done
    while :; do
        alive=0
        for i in "${!pids[@]}"; do
            p="${pids[$i]}"
            if kill -0 "$p" 2>/dev/null; then
                alive=1
                hwm="$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)"
                ((${hwm:-0} > ${peaks[$i]})) && peaks[$i]="$hwm"
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
        sleep 0.5
    done
    if [[ -n "$t1" && -n "$tn" ]] && ((sn > s1)); then
        tps="$(python3 -c 'import sys; a = [float(x) for x in sys.argv[1:]]; print(a[0] * 256 / (a[2] - a[1]))' "$((sn - s1))" "$t1" "$tn")"
    fi
    local rc=0
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    kill "$coord" 2>/dev/null || true
    wait "$coord" 2>/dev/null || true
    if ((rc != 0)); then
        echo "S=$s recompute $policy: a worker failed" >&2
        tail -n 20 "$dir"/worker-*.log >&2
        exit 1
    fi
    local plan
    plan="$(plan_json "$dir/run.yaml")"
    for ((st = 0; st < s; st++)); do
        rows+="$(python3 -c '
import json, sys
p = json.loads(sys.argv[1])["plan"]
st, peak_kib, tps, s, policy = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
stage = p["stages"][st]
planned = (stage["total_bytes"] + (32 << 20)) / 2**30
measured = peak_kib / 2**20
params = p["params"] / 1e9
tps = "%.1f" % float(tps) if tps else "-"
print("| %s | %.2fB | %s | %d | %d..%d | %.2f | %.2f | %+.1f%% | %s |" % (
    s, params, policy, st, stage["layers"]["start"], stage["layers"]["end"],
    planned, measured, 100 * (planned - measured) / measured, tps if st == 0 else ""))
' "$plan" "$st" "${peaks[$st]}" "$tps" "$s" "$policy")"$'\n'
    done
    echo "S=$s ($layers layers) recompute $policy: peaks ${peaks[*]} KiB, $tps tokens/s"
    rm -rf "$dir/out"
}

rows=""
declare -A chosen
for s in 1 2 4; do
    chosen[$s]="$(layers_for "$s")"
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
params4="$(plan_json "$work/single.yaml" | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["plan"]["params"] / 1e9))')"
elapsed=$(($(date +%s) - started))
{
    echo "# Memory: a model larger than one process trains over stages"
    echo
    echo "Every stage worker runs under \`prlimit --data=$limit\` (RLIMIT_DATA). For each"
    echo "number of stages S the largest model of one family (dim 1024, ffnDim 2816,"
    echo "16 heads, seqLen 64, byte vocabulary) whose every shard process fits 512 MiB"
    echo "under the limit and whose S shards fit this machine's memory. The plan's"
    echo "stage total includes the snapshot of weights and Adam moments one step back"
    echo "a shard process keeps and its checkpoint's bytes while it delivers one; the"
    echo "model is chosen with 8 x its weights beyond the plan as a margin."
    echo "1F1B, 4 micro-batches of 1 × 64 tokens, $steps steps; $threads_total kernel threads"
    echo "shared by the S workers. Planned = \`plan\`'s stage total plus the process"
    echo "overhead; measured = the worker's peak resident set (VmHWM). tokens/s: the"
    echo "steps after the first (256 tokens each), timed from the coordinator's status."
    machine
    echo "Commit: $(git rev-parse --short HEAD). Run time: ${elapsed}s. Load average at the start: $load_at_start"
    echo "(other work shares the cores, so tokens/s vary between runs)."
    echo
    echo "| S | params | recompute | stage | layers | planned GiB | measured GiB | plan error | tokens/s |"
    echo "|---:|---:|---|---:|---|---:|---:|---:|---:|"
    printf '%s' "$rows"
    echo
    echo "The S = 4 model ($params4 B parameters) in one process under the same limit"
    echo "(\`pipewright train\` without \`--processes\`):"
    echo
    echo "> $refusal"
} >"$out"
echo "-> $out (${elapsed}s)"
