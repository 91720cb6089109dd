#!/usr/bin/env bash
# Provision NVRTC (the CUDA run-time compiler) from PyPI's
# nvidia-cuda-nvrtc wheel, so the CUDA kernels can be compiled for sm_90 on a
# machine without a GPU or a CUDA toolkit (`tests/cuda_compile.rs`).
#
# Unpacked once into a cache directory keyed by the wheel's version; a marker
# file is written only after a complete unpack. The last line of stdout is
# the directory that holds libnvrtc.so.13 (put it on LD_LIBRARY_PATH).
# Environment: PIPEWRIGHT_CACHE (cache root).
set -euo pipefail

version="13.0.88"
cache="${PIPEWRIGHT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pipewright}"
dir="$cache/nvrtc-$version"
lib="$dir/nvidia/cu13/lib"
marker="$dir/.pipewright-complete"

if [[ -f "$marker" && -f "$lib/libnvrtc.so.13" ]]; then
    printf '%s\n' "$lib"
    exit 0
fi
mkdir -p "$cache"
exec 9>"$dir.lock"
command -v flock >/dev/null 2>&1 && flock 9
if [[ -f "$marker" && -f "$lib/libnvrtc.so.13" ]]; then
    printf '%s\n' "$lib"
    exit 0
fi
rm -rf "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "nvrtc-env: downloading nvidia-cuda-nvrtc==$version" >&2
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_12_x86_64 --python-version 3.11 -d "$tmp" "nvidia-cuda-nvrtc==$version" >&2
mkdir -p "$dir"
python3 -m zipfile -e "$tmp"/nvidia_cuda_nvrtc-*.whl "$dir" >&2
touch "$marker"
printf '%s\n' "$lib"
