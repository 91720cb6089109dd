#!/usr/bin/env bash
# Build, on a machine with Rust (no GPU needed), everything
# scripts/gpu-check.sh runs on a GPU machine that has no Rust toolchain: the
# release binary and the CUDA test binaries (stripped), plus the quickstart
# corpus. They go to .gpu/ (ignored by git); copy that directory beside the
# checkout on the GPU machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dest=.gpu
rm -rf "$dest"
mkdir -p "$dest/bin"
bash scripts/system-deps.sh
cargo build --release -p pipewright --features cuda
cp target/release/pipewright "$dest/bin/pipewright"
for t in cuda_parity cuda_compile; do
    exe=$(cargo test --release -p pipewright --features cuda --test "$t" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]:
        print(m["executable"])' "$t" | tail -1)
    cp "$exe" "$dest/bin/$t"
done
strip "$dest"/bin/*
# The commit the binaries were built from (a trailing + marks local changes).
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- worker spec || echo +)" > "$dest/COMMIT"
mkdir -p "$dest/fortunes"
find /usr/share/games/fortunes -maxdepth 1 -type f ! -name '*.dat' ! -name '*.u8' -exec cp {} "$dest/fortunes/" \;
du -sh "$dest"
