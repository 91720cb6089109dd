#!/usr/bin/env bash
# Sourced by the GPU scripts: put the CUDA libraries on LD_LIBRARY_PATH (the
# toolkit's, else the ones PyTorch's wheels bring). cudarc looks NCCL up as
# libnccl.so; the wheel ships libnccl.so.2, so a link is made.
libs=/tmp/pipewright-libs
mkdir -p "$libs"
paths="$libs"
for d in /usr/local/cuda/lib64 $(python3 - <<'PY' 2>/dev/null
import os
import nvidia
for p in nvidia.__path__:
    for root, dirs, files in os.walk(p):
        if any(f.startswith(("libnvrtc", "libcublas", "libnccl")) for f in files):
            print(root)
PY
); do
    [[ -d "$d" ]] && paths="$paths:$d"
    [[ -e "$d/libnccl.so.2" && ! -e "$libs/libnccl.so" ]] && ln -s "$d/libnccl.so.2" "$libs/libnccl.so"
done
export LD_LIBRARY_PATH="$paths:${LD_LIBRARY_PATH:-}"
