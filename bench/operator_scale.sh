#!/usr/bin/env bash
# The operator at scale: one TrainingRun of 64 stages x 16 replicas (1,024
# shard pods and a coordinator) on 256 fake nodes with 8 GPUs each (kwok,
# 1 GPU per shard), on the control plane the end-to-end tests build
# (e2e/build.sh, e2e/cluster.sh). Not part of CI; takes a few minutes.
#
# Measures:
#   - seconds from `kubectl apply` until every pod exists, until every pod is
#     bound to a node (spec.nodeName set), until every pod is Running;
#   - reconcile duration (p50, p99 from the operator's
#     pipewright_operator_reconcile_duration_seconds histogram);
#   - API requests made by the operator, per reconcile (from the API
#     server's audit log, which records the operator's ServiceAccount only);
#   - writes by the operator in the 30 s after the run settles (there should
#     be none but the leader lease's renewals).
#
#   bench/operator_scale.sh [RESULT.md]   (default: print the figures only)
#
# Knobs: SCALE_STAGES (64), SCALE_REPLICAS (16), SCALE_NODES (256),
# SCALE_QUIET_S (30), SCALE_GPUS_PER_SHARD (1; 2 fills every GPU of the nodes).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
result=${1:-}
stages=${SCALE_STAGES:-64}
replicas=${SCALE_REPLICAS:-16}
nodes=${SCALE_NODES:-256}
quiet=${SCALE_QUIET_S:-30}
gpus=${SCALE_GPUS_PER_SHARD:-1}
shards=$((stages * replicas))
pods=$((shards + 1))
ns=scale
run=scale-run
system_ns=pipewright-system
release=pipewright

say() { printf '[operator_scale %3ds] %s\n' "$SECONDS" "$*" >&2; }
die() {
    printf 'operator_scale.sh: %s\n' "$*" >&2
    exit 1
}
for tool in python3 curl openssl; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done

# shellcheck source=e2e/versions.sh
source e2e/versions.sh
bin=$(e2e/build.sh | tail -1) || die "e2e/build.sh failed (the control plane is built from source; needs Go)"
export PATH="$bin:$PATH"
operator_bin=${PIPEWRIGHT_OPERATOR_BIN:-}
if [[ -z $operator_bin ]]; then
    nice -n 10 cargo build --release --quiet -p pipewright-operator
    operator_bin=$repo/target/release/pipewright-operator
fi
[[ -x $operator_bin ]] || die "no $operator_bin"

work=$(mktemp -d "${TMPDIR:-/tmp}/pipewright-scale.XXXXXX")
operator_pid=
cleanup() {
    local rc=$?
    if [[ -n $operator_pid ]]; then
        kill "$operator_pid" 2>/dev/null || true
        wait "$operator_pid" 2>/dev/null || true
    fi
    e2e/cluster.sh down "$work/cluster" || true
    if [[ $rc -ne 0 ]]; then
        echo "logs kept in $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The audit log records every request of the operator's ServiceAccount.
cat >"$work/audit.yaml" <<EOF
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted]
rules:
- level: Metadata
  users: ["system:serviceaccount:$system_ns:$release"]
- level: None
EOF
say "control plane with $nodes nodes"
E2E_NODES=$nodes E2E_AUDIT_POLICY=$work/audit.yaml e2e/cluster.sh up "$work/cluster"
# shellcheck disable=SC1091
source "$work/cluster/env"
audit_log=$work/cluster/logs/audit.log

say "helm install; the operator runs here as the chart's ServiceAccount"
helm install "$release" charts/pipewright -n "$system_ns" --create-namespace \
    --set gpusPerShard="$gpus" >"$work/helm.log" 2>&1 || die "helm install: $(cat "$work/helm.log")"
kubectl wait --for condition=established --timeout=60s crd/trainingruns.pipewright.dev >/dev/null
token=$(kubectl create token "$release" -n "$system_ns" --duration 2h)
cat >"$work/operator.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: bench
  cluster: {server: "$E2E_API_SERVER", certificate-authority: "$E2E_CA"}
users:
- name: operator
  user: {token: "$token"}
contexts:
- name: bench
  context: {cluster: bench, user: operator, namespace: $system_ns}
current-context: bench
EOF
read -r metrics_port health_port <<<"$(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')"
KUBECONFIG=$work/operator.kubeconfig POD_NAMESPACE=$system_ns POD_NAME=$release-bench RUST_LOG=warn \
    "$operator_bin" run --image pipewright:bench --gpus-per-shard "$gpus" --leader-elect \
    --lease-name "$release" --metrics-addr "127.0.0.1:$metrics_port" \
    --health-addr "127.0.0.1:$health_port" >"$work/operator.log" 2>&1 &
operator_pid=$!
deadline=$((SECONDS + 60))
until curl -sf "http://127.0.0.1:$health_port/readyz" >/dev/null 2>&1; do
    kill -0 "$operator_pid" 2>/dev/null || die "the operator exited: $(tail -5 "$work/operator.log")"
    ((SECONDS < deadline)) || die "the operator not ready within 60 s"
    sleep 0.2
done
until [[ $(kubectl get lease "$release" -n "$system_ns" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null) == "$release-bench" ]]; do
    ((SECONDS < deadline)) || die "the operator did not take the lease within 60 s"
    sleep 0.2
done
kubectl create namespace "$ns" >/dev/null
until kubectl get serviceaccount default -n "$ns" >/dev/null 2>&1; do sleep 0.2; done

metric() {
    curl -sf "http://127.0.0.1:$metrics_port/metrics" | awk -v name="$1" '$1 == name { print $2 }'
}
cat >"$work/run.yaml" <<EOF
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata:
  name: $run
spec:
  model: {dim: 512, layers: 128, heads: 8, ffnDim: 1376, seqLen: 256}
  data:
    sources: ["/data/corpus"]
  training: {steps: 1000, microBatchSize: 4, microBatches: 32, learningRate: 0.001}
  pipeline: {stages: $stages, replicas: $replicas, schedule: 1f1b, codec: f32}
EOF
curl -sf "http://127.0.0.1:$metrics_port/metrics" >"$work/metrics-before.txt"
audit_before=$(wc -l <"$audit_log")

say "apply: $stages stages x $replicas replicas = $shards shards"
t0=$(date +%s.%N)
kubectl apply -n "$ns" -f "$work/run.yaml" >/dev/null
# Samples every half second: "seconds created bound running".
: >"$work/samples.txt"
deadline=$((SECONDS + 300))
while :; do
    now=$(date +%s.%N)
    kubectl get pods -n "$ns" -l "pipewright.dev/run=$run" \
        -o jsonpath='{range .items[*]}{.spec.nodeName}{" "}{.status.phase}{"\n"}{end}' >"$work/pods.txt"
    created=$(wc -l <"$work/pods.txt")
    bound=$(awk 'NF == 2' "$work/pods.txt" | wc -l)
    running=$(awk '$2 == "Running"' "$work/pods.txt" | wc -l)
    echo "$(python3 -c "print(f'{$now - $t0:.1f}')") $created $bound $running" >>"$work/samples.txt"
    [[ $running -ge $pods ]] && break
    if ((SECONDS >= deadline)); then
        tail -3 "$work/samples.txt" >&2
        die "not every pod Running within 300 s"
    fi
    sleep 0.5
done
say "every pod Running: $(tail -1 "$work/samples.txt")"
# Settled: the run's status is written (phase Running, all shards ready).
until [[ $(kubectl get tr "$run" -n "$ns" -o jsonpath='{.status.readyShards}') == "$shards" ]]; do
    ((SECONDS < deadline)) || die "status.readyShards never reached $shards"
    sleep 0.5
done
settled=$(date +%s.%N)
sleep 5
curl -sf "http://127.0.0.1:$metrics_port/metrics" >"$work/metrics-settled.txt"
audit_settled=$(wc -l <"$audit_log")
say "settled; watching $quiet s of steady state"
sleep "$quiet"
curl -sf "http://127.0.0.1:$metrics_port/metrics" >"$work/metrics-after.txt"
audit_after=$(wc -l <"$audit_log")
kubectl get tr -n "$ns" >"$work/tr.txt"

python3 - "$work" "$audit_before" "$audit_settled" "$audit_after" "$t0" "$settled" "$pods" "$quiet" \
    >"$work/figures.md" <<'EOF'
import json, re, sys
work, a0, a1, a2, t0, settled, pods, quiet = sys.argv[1:]
a0, a1, a2, pods, quiet = int(a0), int(a1), int(a2), int(pods), int(quiet)
t0, settled = float(t0), float(settled)

def first(col, want):
    for line in open(f"{work}/samples.txt"):
        t, *counts = line.split()
        if int(counts[col]) >= want:
            return float(t)
    return float("nan")

def metrics(name):
    text = open(f"{work}/{name}").read()
    out = {}
    for m in re.finditer(r"^(pipewright_operator_[a-z_]+)(\{[^}]*\})? (\S+)$", text, re.M):
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out

before, settled_m, after = metrics("metrics-before.txt"), metrics("metrics-settled.txt"), metrics("metrics-after.txt")

def delta(a, b, key):
    return b.get(key, 0.0) - a.get(key, 0.0)

def quantile(q, a, b):
    name = "pipewright_operator_reconcile_duration_seconds_bucket"
    buckets = []
    for key, value in b.items():
        m = re.match(re.escape(name) + r'\{.*le="([^"]+)".*\}', key)
        if m:
            le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
            buckets.append((le, value - a.get(key, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return float("nan")
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= q * total:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (q * total - below) / max(count - below, 1e-9)
        lower, below = le, count
    return lower

reconciles = delta(before, settled_m, "pipewright_operator_reconciles_total")
quiet_reconciles = delta(settled_m, after, "pipewright_operator_reconciles_total")

def requests(lo, hi):
    rows = []
    with open(f"{work}/cluster/logs/audit.log") as f:
        for i, line in enumerate(f):
            if lo <= i < hi:
                e = json.loads(line)
                rows.append(e)
    return rows

WRITES = {"create", "update", "patch", "delete", "deletecollection"}

def summary(rows):
    by = {}
    for e in rows:
        r = e.get("objectRef", {})
        key = f'{e["verb"]} {r.get("resource", "?")}' + (f'/{r["subresource"]}' if r.get("subresource") else "")
        by[key] = by.get(key, 0) + 1
    return by

busy, calm = requests(a0, a1), requests(a1, a2)
busy_by, calm_by = summary(busy), summary(calm)
calm_writes = {k: v for k, v in calm_by.items() if k.split()[0] in WRITES}
calm_nonlease = {k: v for k, v in calm_writes.items() if "leases" not in k}
with open(f"{work}/steady-writes", "w") as f:
    f.write(f"{sum(calm_nonlease.values())}\n")

print(f"| pods (1 coordinator + shards) | {pods} |")
print(f"| all pods created | {first(0, pods):.1f} s after `kubectl apply` |")
print(f"| all pods bound to a node | {first(1, pods):.1f} s |")
print(f"| all pods Running (kwok) | {first(2, pods):.1f} s |")
print(f"| status settled (readyShards = shards) | {settled - t0:.1f} s |")
print(f"| reconciles until settled | {reconciles:.0f} |")
print(f"| reconcile duration p50 / p99 | {quantile(0.5, before, settled_m) * 1000:.0f} ms / {quantile(0.99, before, settled_m) * 1000:.0f} ms |")
print(f"| operator API requests until settled | {len(busy)} ({len(busy) / max(reconciles, 1):.1f} per reconcile) |")
print(f"| steady state ({quiet} s): reconciles, requests | {quiet_reconciles:.0f}, {len(calm)} |")
print(f"| steady state writes other than the leader lease | {sum(calm_nonlease.values())} |")
print()
print("Operator requests until settled, by verb and resource:")
print()
for k, v in sorted(busy_by.items(), key=lambda kv: -kv[1]):
    print(f"- {k}: {v}")
print()
print(f"Operator requests in the {quiet} s of steady state:")
print()
for k, v in sorted(calm_by.items(), key=lambda kv: -kv[1]):
    print(f"- {k}: {v}")
EOF
cat "$work/figures.md"
writes=$(cat "$work/steady-writes")

if [[ -n $result ]]; then
    {
        echo "# Operator at scale"
        echo
        echo "\`bench/operator_scale.sh\`, $(date -u +%Y-%m-%d): one TrainingRun of $stages stages x $replicas"
        echo "replicas ($shards shard pods, $gpus GPU(s) each) on $nodes kwok nodes with 8 GPUs each; etcd,"
        echo "kube-apiserver, kube-controller-manager, kube-scheduler ($KUBERNETES_VERSION), kwok and the"
        echo "operator (release build, leader election on, as the chart's ServiceAccount) all on one machine."
        echo
        echo "Machine: $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)),"
        echo "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) memory, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end."
        echo
        echo "| figure | value |"
        echo "| --- | --- |"
        cat "$work/figures.md"
    } >"$result"
    say "wrote $result"
fi
[[ $writes == 0 ]] || die "the operator wrote $writes times in steady state"
