#!/usr/bin/env bash
# The end-to-end tests: a real Kubernetes control plane (built once from
# source into ~/.cache/pipewright), the Helm chart, and the operator.
# See e2e/README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec bash e2e/run.sh "$@"
