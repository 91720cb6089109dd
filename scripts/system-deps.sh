#!/usr/bin/env bash
# System packages Pipewright's quickstart and tests need, from Debian's
# archive: `fortunes` provides the quickstart corpus (about 2 MB of English
# quotations in /usr/share/games/fortunes); `prometheus` is the real
# Prometheus the end-to-end suite runs every dashboard query on; `chromium`
# is the headless browser the run page is tested in. Idempotent.
set -euo pipefail

need=()
[[ -d /usr/share/games/fortunes ]] || need+=(fortunes)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
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
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
