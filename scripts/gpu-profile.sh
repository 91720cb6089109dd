#!/usr/bin/env bash
# Profile the CUDA attention kernels with Nsight Compute on a GPU machine
# (after scripts/gpu-pack.sh, like scripts/gpu-check.sh): one forward, one dQ
# and one dK/dV launch of a 2-layer model at the benchmark's shapes.
# Report: $PIPEWRIGHT_GPU_OUT/ncu.txt (default bench/results/gpu).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${PIPEWRIGHT_GPU_OUT:-bench/results/gpu}"
mkdir -p "$out"
source scripts/gpu-libs.sh
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)
[[ -n "$ncu" ]] || { echo "gpu-profile: ncu not found" >&2; exit 1; }
timeout 240 "$ncu" --clock-control none -k 'regex:attention_(forward|backward)' --launch-skip 1 --launch-count 3 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section LaunchStats \
    .gpu/bin/pipewright bench gpu --layers 2 --steps 1 --warmup 0 "$@" > "$out/ncu.txt" 2>&1
rc=$?
grep -E "attention_|Duration|Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Warp Cycles Per Issued|Stall|Issue Slots Busy|Executed Ipc|Block Limit" "$out/ncu.txt" | head -120
exit $rc
