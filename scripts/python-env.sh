#!/usr/bin/env bash
# Provision the Python environment for the benchmark and the export tests.
#
# The virtual environment lives in a cache directory keyed by the hash of
# python/requirements.txt, so a change of pins gets a fresh environment and an
# unchanged one is reused across runs and checkouts. A marker file is written
# only after every requirement installed, so an interrupted install is redone.
#
# Usage: PY=$(bash scripts/python-env.sh | tail -1)
# Logs go to stderr; the last line of stdout is the environment's python.
# Environment: PIPEWRIGHT_CACHE (cache root), PIPEWRIGHT_PYTHON (base interpreter).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$root/python/requirements.txt"
cache="${PIPEWRIGHT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pipewright}"

log() { printf 'python-env: %s\n' "$*" >&2; }

if [[ ! -f "$requirements" ]]; then
    log "missing $requirements"
    exit 1
fi

hash="$(sha256sum "$requirements" | cut -c1-12)"
venv="$cache/venv-$hash"
marker="$venv/.pipewright-complete"
python="$venv/bin/python"

if [[ -f "$marker" && -x "$python" ]]; then
    log "reusing $venv"
    printf '%s\n' "$python"
    exit 0
fi

# Pick a base interpreter: an explicit one, else python3.11 (the pins are
# chosen for it), else whatever python3 is on PATH.
base="${PIPEWRIGHT_PYTHON:-}"
if [[ -z "$base" ]]; then
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then
            base="$candidate"
            break
        fi
    done
fi
if [[ -z "$base" ]]; then
    log "no python3 found; install Python 3.11 or set PIPEWRIGHT_PYTHON"
    exit 1
fi

mkdir -p "$cache"
# Serialise concurrent provisioning of the same environment (two test jobs
# starting at once would otherwise install into one directory together).
exec 9>"$cache/venv-$hash.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi
if [[ -f "$marker" && -x "$python" ]]; then
    log "reusing $venv (provisioned by a concurrent run)"
    printf '%s\n' "$python"
    exit 0
fi

# A directory without the marker is a half-finished install: start over so no
# stale or partial package survives.
if [[ -d "$venv" ]]; then
    log "removing incomplete $venv"
    rm -rf "$venv"
fi

log "creating $venv with $("$base" --version 2>&1)"
"$base" -m venv "$venv" >&2
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$python" -m pip install --quiet --upgrade pip >&2
log "installing $(grep -cvE '^\s*(#|$)' "$requirements") pinned requirements"
"$python" -m pip install --quiet -r "$requirements" >&2
"$python" -c 'import torch, transformers, safetensors, numpy, yaml, pytest' >&2
cp "$requirements" "$marker"
log "ready: $venv"
printf '%s\n' "$python"
