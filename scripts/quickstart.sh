#!/usr/bin/env bash
# The main job: install the corpus, build, and train the quickstart model
# (`pipewright train examples/quickstart.yaml`). Extra arguments go to
# `pipewright train` (for example --steps 50 or --quiet).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/system-deps.sh
cargo build --release -p pipewright
exec target/release/pipewright train examples/quickstart.yaml "$@"
