#!/usr/bin/env bash
# System packages Pipewright's quickstart and tests need, from Debian's
# archive: the `fortunes` package provides the quickstart corpus (about 2 MB
# of English quotations in /usr/share/games/fortunes). Idempotent.
set -euo pipefail

need=()
[[ -d /usr/share/games/fortunes ]] || need+=(fortunes)
if ((${#need[@]} == 0)); then
    exit 0
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "system-deps: need root or sudo to install ${need[*]}" >&2; exit 1; }
    sudo="sudo"
fi
echo "system-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >&2
$sudo apt-get install -y -qq "${need[@]}" >&2
