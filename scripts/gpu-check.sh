#!/usr/bin/env bash
# The CUDA backend's proof on a GPU machine (H100/H200), in one run of a few
# minutes. It builds nothing: run scripts/gpu-pack.sh on a machine with Rust
# first and bring .gpu/ along. It prints the GPU and driver, compiles the
# kernels, runs the parity tests (every kernel against the CPU, the whole
# model's gradients, 50 quickstart steps against the CPU loss curve, NCCL
# with one rank), trains the quickstart on the GPU from the command line,
# and runs the benchmark beside PyTorch on the same shapes. Results go to
# $PIPEWRIGHT_GPU_OUT (default bench/results/gpu).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=.gpu/bin
out="${PIPEWRIGHT_GPU_OUT:-bench/results/gpu}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
fail=0
step() { printf '\n==> %s\n' "$*"; }

source scripts/gpu-libs.sh

step "GPU and driver"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
echo "binaries built from commit $(cat .gpu/COMMIT 2>/dev/null || echo unknown)" | tee -a "$out/gpu.txt"

step "kernels compile (NVRTC, sm_90)"
timeout 120 "$bin/cuda_compile" --test-threads 1 2>&1 | tee "$out/compile.txt" || fail=1

step "parity: CUDA against the CPU"
PIPEWRIGHT_REQUIRE_GPU=1 PIPEWRIGHT_GPU_OUT="$out" PIPEWRIGHT_QUICKSTART_CORPUS="$PWD/.gpu/fortunes" \
    timeout 200 "$bin/cuda_parity" --test-threads 1 --nocapture 2>&1 | tee "$out/parity.txt"
[[ ${PIPESTATUS[0]} -eq 0 ]] || fail=1

step "pipewright train --device cuda (quickstart, 100 steps)"
sed "s|/usr/share/games/fortunes|$PWD/.gpu/fortunes|" examples/quickstart.yaml > /tmp/quickstart-gpu.yaml
timeout 120 "$bin/pipewright" train /tmp/quickstart-gpu.yaml --device cuda --steps 100 --overwrite \
    --quiet --out /tmp/quickstart-gpu 2>&1 | tee "$out/train.txt"
[[ ${PIPESTATUS[0]} -eq 0 ]] || fail=1

step "benchmark: TinyLlama-1.1B shapes against PyTorch eager, 8192 tokens per step"
for shape in "1024 8" "2048 4"; do
    set -- $shape
    tag="seq$1"
    timeout 150 "$bin/pipewright" bench gpu --seq-len "$1" --batch "$2" --steps 10 --warmup 2 2>&1 |
        tee "$out/bench_pipewright_$tag.json"
    timeout 150 python3 bench/gpu_torch.py --seq-len "$1" --batch "$2" --steps 10 --warmup 2 2>&1 |
        tee "$out/bench_torch_$tag.json"
done
python3 - "$out" <<'PY' | tee "$out/bench.md"
import json, sys
d = sys.argv[1]
def last_json(p):
    try:
        lines = open(p).read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            return json.loads(line)
    return None
print("| shape | implementation | tokens/s | step ms | model TFLOP/s | MFU | device GiB |")
print("|---|---|---:|---:|---:|---:|---:|")
ratios = []
for tag, shape in (("seq1024", "seq 1024 × 8"), ("seq2048", "seq 2048 × 4")):
    a, b = last_json(f"{d}/bench_pipewright_{tag}.json"), last_json(f"{d}/bench_torch_{tag}.json")
    for r in (a, b):
        if r:
            print(f"| {shape} | {r['impl']} | {r['tokens_per_sec']:,.0f} | {r['step_ms']:.0f} | "
                  f"{r['model_tflops']:.0f} | {100*r['mfu']:.1f}% | {r['device_memory_gib']:.1f} |")
    if a and b:
        ratios.append(f"{shape}: pipewright / pytorch tokens/s = {a['tokens_per_sec']/b['tokens_per_sec']:.2f}x")
    if a and "breakdown_ms" in a:
        ratios.append(f"{shape}: pipewright breakdown (ms) " + json.dumps({k: round(v, 1) for k, v in a["breakdown_ms"].items()}))
print()
for r in ratios:
    print(r)
PY
echo
[[ $fail -eq 0 ]] && echo "gpu-check: passed" || echo "gpu-check: FAILED"
exit $fail
