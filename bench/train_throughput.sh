#!/usr/bin/env bash
# Training throughput of Pipewright against PyTorch on the same model.
#
# Builds the release binary, provisions the Python environment, then times
# `pipewright bench train` and bench/torch_train.py on one manifest with the
# same thread count, alternating the two (A/B/A/B...) so that drift in the
# machine's speed hits both alike. Prints a markdown report and writes it to
# bench/results/train_throughput.md.
#
# Usage: bench/train_throughput.sh [MANIFEST] [--steps N] [--warmup W]
#                                  [--threads T] [--repeats R] [--out FILE]
# Environment: PIPEWRIGHT_BIN (a prebuilt binary; skips the build).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

manifest="examples/quickstart.yaml"
steps=10
warmup=2
threads="$(nproc)"
repeats=3
out="bench/results/train_throughput.md"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --steps) steps="$2"; shift 2 ;;
        --warmup) warmup="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --repeats) repeats="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) manifest="$1"; shift ;;
    esac
done

if [[ ! -f "$manifest" ]]; then
    echo "manifest $manifest not found" >&2
    exit 1
fi

# PIPEWRIGHT_BIN names a prebuilt binary to measure instead of building one.
bin="${PIPEWRIGHT_BIN:-}"
if [[ -z "$bin" ]]; then
    echo "building pipewright (release)" >&2
    cargo build --release -p pipewright >&2
    bin="$root/target/release/pipewright"
fi
py="$(bash scripts/python-env.sh | tail -1)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The last JSON object a command printed on stdout.
last_json() { grep -E '^\{' | tail -1; }

# Other processes on the machine skew both measurements (OpenMP-threaded torch
# more than most), so the report records the load around the runs.
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"

# The first torch run tries both attention implementations; later runs reuse
# the faster one so that every repeat compares like with like.
torch_attn="best"
for ((r = 1; r <= repeats; r++)); do
    echo "repeat $r/$repeats: pipewright" >&2
    "$bin" bench train "$manifest" --steps "$steps" --warmup "$warmup" --threads "$threads" \
        </dev/null | last_json >>"$work/ours.jsonl"
    echo "repeat $r/$repeats: torch ($torch_attn)" >&2
    "$py" bench/torch_train.py "$manifest" --steps "$steps" --warmup "$warmup" \
        --threads "$threads" --attn "$torch_attn" </dev/null | last_json >>"$work/torch.jsonl"
    if [[ "$torch_attn" == "best" ]]; then
        torch_attn="$("$py" -c 'import json,sys; print(json.loads(sys.stdin.readline())["attn_implementation"])' \
            <"$work/torch.jsonl")"
    fi
done

load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
cpu_model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
cpu_model="${cpu_model:-unknown}"
rustc_version="$(rustc --version 2>/dev/null || echo unknown)"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

mkdir -p "$(dirname "$out")"
"$py" - "$work/ours.jsonl" "$work/torch.jsonl" "$manifest" "$steps" "$warmup" "$threads" \
    "$cpu_model" "$(nproc)" "$rustc_version" "$commit" "$load_before" "$load_after" >"$out" <<'PYEOF'
import json
import statistics
import sys

import torch
import yaml

sys.path.insert(0, "bench")
import torch_train  # noqa: E402  (the same FLOP count for both rows)

(ours_file, torch_file, manifest, steps, warmup, threads, cpu, cores, rustc, commit,
 load_before, load_after) = sys.argv[1:]
ours = [json.loads(line) for line in open(ours_file) if line.strip()]
ref = [json.loads(line) for line in open(torch_file) if line.strip()]
if not ours or not ref:
    sys.exit("a benchmark run printed no result")


def median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


model = yaml.safe_load(open(manifest))["spec"]["model"]
training = yaml.safe_load(open(manifest))["spec"]["training"]
attn = ref[-1]["attn_implementation"]
ours_tps, ref_tps = median(ours, "tokens_per_sec"), median(ref, "tokens_per_sec")

print("# Training throughput: Pipewright vs PyTorch (CPU, float32)\n")
print(
    f"Manifest `{manifest}`: dim {model['dim']}, {model['layers']} layers, "
    f"{model['heads']} heads ({model.get('kvHeads') or model['heads']} kv), "
    f"ffn {model['ffnDim']}, seqLen {model['seqLen']}, "
    f"tied embeddings {bool(model.get('tiedEmbeddings', False))}; "
    f"{ours[0]['params']:,} parameters; "
    f"{training['microBatchSize']} x {training.get('microBatches', 1)} sequences "
    f"= {ours[0]['tokens_per_step']:,} tokens per step.\n"
)
print(
    f"{len(ours)} alternating repeats of {steps} timed steps after {warmup} warm-up steps, "
    f"{threads} threads each; medians over repeats.\n"
)
spec = torch_train.load_spec(manifest, int(threads))
flops_per_step = torch_train.matmul_flops_per_step(spec)


def row(name, rows, ratio):
    step_ms = median(rows, "step_ms")
    return (
        f"| {name} | {median(rows, 'tokens_per_sec'):,.0f} | {ratio:.2f} | {step_ms:.1f} "
        f"| {median(rows, 'peak_rss_mib'):.0f} | {median(rows, 'matmul_gflops'):.1f} "
        f"| {100 * median(rows, 'matmul_time_fraction'):.0f}% "
        f"| {flops_per_step / (step_ms / 1e3) / 1e9:.1f} |"
    )


print(
    "| implementation | tokens/s | ours/torch | step ms | peak RSS MiB "
    "| matmul GFLOP/s | time in matmul | model GFLOP/s |"
)
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
print(row("pipewright", ours, ours_tps / ref_tps))
print(row(f"torch ({attn})", ref, 1.0))
print()
print("Per repeat, tokens/s: pipewright " + ", ".join(f"{r['tokens_per_sec']:,.0f}" for r in ours)
      + "; torch " + ", ".join(f"{r['tokens_per_sec']:,.0f}" for r in ref) + ".")
variants = ref[0].get("variants")
if variants:
    print("Torch attention implementations in the first repeat, tokens/s: "
          + ", ".join(f"{k} {v:,.0f}" for k, v in variants.items()) + ".")
print(
    "\nmatmul GFLOP/s is the rate inside matrix-product kernels (pipewright: its "
    "own counters; torch: aten mm/addmm/bmm operators in one profiled step, which "
    "do not include the products inside a fused attention kernel). model GFLOP/s "
    "is the model's matmul FLOPs per step (3 x forward, causal half of attention) "
    "over the step time, the same count for both. Torch's peak RSS includes the "
    "interpreter and the torch libraries.\n"
)
# The first lines of torch's build description name the compiler, the BLAS
# (MKL or OpenBLAS), oneDNN, OpenMP and the SIMD level; the long build-settings
# line after them is noise here.
build = [l.strip(" -") for l in torch.__config__.show().splitlines()[1:]]
build = [l for l in build if l and not l.startswith("Build settings")][:8]
print("## Machine\n")
print(f"- CPU: {cpu}, {cores} cores visible")
print(f"- load average (1, 5, 15 min): {load_before} before, {load_after} after")
print(f"- pipewright {commit}, {rustc}")
print(f"- torch {torch.__version__}, built with: " + "; ".join(build))
PYEOF

cat "$out"
echo "wrote $out" >&2
