#!/usr/bin/env bash
# Makes docs/run-page.png, the picture of the coordinator's run page: a
# small run of 2 stages × 2 replicas as local processes
# (`pipewright train --processes`), one worker killed with SIGKILL midway
# so the page shows a recovery, then headless Chromium's screenshot of
# http://COORDINATOR/.
#
#   scripts/run-page-screenshot.sh [OUTPUT.png]
#
# Environment: PIPEWRIGHT_BIN (a built `pipewright`; default: cargo build
# --release), PIPEWRIGHT_CHROMIUM (the browser; default: chromium on the
# PATH), PORT (the coordinator's port; default 7171).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
output=${1:-$root/docs/run-page.png}
port=${PORT:-7171}
url="http://127.0.0.1:$port"

browser=${PIPEWRIGHT_CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
if [[ -z $browser ]]; then
    echo "run-page-screenshot: needs chromium (scripts/system-deps.sh installs it)" >&2
    exit 1
fi
bin=${PIPEWRIGHT_BIN:-}
if [[ -z $bin ]]; then
    (cd "$root" && cargo build --release -p pipewright --bin pipewright >&2)
    bin=$root/target/release/pipewright
fi

work=$(mktemp -d)
run_pid=""
cleanup() {
    if [[ -n $run_pid ]]; then
        # The launcher's workers first, then the launcher.
        for child in $(pgrep -P "$run_pid" || true); do kill -9 "$child" 2>/dev/null || true; done
        kill -9 "$run_pid" 2>/dev/null || true
        wait "$run_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# A corpus of generated sentences (nothing downloaded).
names=(ada bo cy di ed fay gus)
verbs=(waves greets follows calls thanks)
for ((i = 0; i < 4000; i++)); do
    echo "${names[i % 7]} ${verbs[i % 5]} ${names[(i * 3 + 1) % 7]} $((i % 9 + 1)) times."
done >"$work/corpus.txt"
cat >"$work/demo.yaml" <<EOF
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {name: demo}
spec:
  model: {dim: 64, layers: 4, heads: 4, kvHeads: 2, ffnDim: 128, seqLen: 32, tiedEmbeddings: true}
  data: {sources: ["$work/corpus.txt"]}
  training: {steps: 5000, microBatchSize: 4, microBatches: 4, learningRate: 0.005, warmupSteps: 10, seed: 7, threads: 1}
  pipeline: {stages: 2, replicas: 2}
  checkpoint: {every: 50}
EOF

"$bin" train --processes --quiet --coordinator-listen "127.0.0.1:$port" \
    --out "$work/run" "$work/demo.yaml" >"$work/train.log" 2>&1 &
run_pid=$!

# The value of a top-level number field of the coordinator's /status.
field() {
    curl -sf "$url/status" | grep -o "\"$1\":[0-9]*" | head -n1 | cut -d: -f2
}
# Waits up to $2 seconds for field $1 to reach $3.
wait_for() {
    local deadline=$((SECONDS + $2))
    until [[ $(field "$1" 2>/dev/null || echo 0) -ge $3 ]]; do
        if ((SECONDS > deadline)) || ! kill -0 "$run_pid" 2>/dev/null; then
            echo "run-page-screenshot: $1 never reached $3; the run's log:" >&2
            cat "$work/train.log" >&2
            exit 1
        fi
        sleep 0.5
    done
}

wait_for step 180 60
victim=$(pgrep -P "$run_pid" | tail -n1)
echo "run-page-screenshot: kill -9 worker process $victim at step $(field step)" >&2
kill -9 "$victim"
wait_for recoveries 120 1
lost_at=$(field step)
wait_for step 180 $((lost_at + 60))

mkdir -p "$(dirname "$output")"
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --user-data-dir="$work/profile" --window-size=1280,1240 \
    --virtual-time-budget=4000 --screenshot="$output" "$url/" >/dev/null 2>&1
echo "run-page-screenshot: wrote $output" >&2
