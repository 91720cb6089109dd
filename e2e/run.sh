#!/usr/bin/env bash
# End-to-end tests of the operator and its Helm chart against a real
# Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) whose nodes are played by kwok: 8 fake GPU nodes in 2 zones
# and 4 racks. Pods are scheduled and go Running/Ready, but no container runs,
# so the operator itself runs here as a local process, authenticated as the
# chart's ServiceAccount so that the chart's RBAC is what it gets.
#
# Scenarios:
#   chart     helm lint/template, values schema; the chart's CRD = crds/ = the
#             operator's `crd` output
#   install   helm install; RBAC; the operator runs with the Deployment's own
#             args and answers /healthz, /readyz, /metrics
#   place     a 3-stage x 2-replica run: coordinator + one pod per shard,
#             GPU requests, replicas of a stage on distinct nodes, printer columns
#   refuse    malformed manifests refused by the API server, naming the field
#   replace   a deleted shard pod comes back within 5 s; a failed one is
#             replaced; status, events and metrics record the moves
#   node lost a shard whose node goes NotReady moves to another node
#   suspend   spec.suspend deletes the pods and keeps the rest; resuming
#             brings them back
#   failover  a standby replica takes the lease when the leader stops (clean
#             exit on SIGTERM, lease released) and carries on
#   delete    deleting the run leaves nothing it owned
#   train     a 2-stage x 2-replica run trains for real: e2e/kubelet.py runs
#             every pod kwok marks Running as a local `pipewright` process
#             with the pod's args and env (each pod on its own 127.0.0.X);
#             `kubectl get tr` shows step and loss moving, the coordinator
#             says Succeeded, and so does the run; a real Prometheus scrapes
#             the chart's monitors' targets and every dashboard query returns
#             data (e2e/prometheus.py); a real Jaeger holds every step's
#             trace (e2e/traces.py); the operator deletes the run after its
#             ttlSecondsAfterFinished
#   shutdown  the last replica stops cleanly; helm uninstall
#
# Exits 0 with a SKIP line only when a tool cannot be built (no Go toolchain).
# E2E_KEEP=1 keeps the cluster's directory (logs) after the run.
set -Eeuo pipefail
# Any command failing outside a check names itself.
trap 'printf "\nFAIL: line %s: %s (exit %s)\n" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
e2e=$repo/e2e
# shellcheck source=e2e/versions.sh
source "$e2e/versions.sh"
started=$SECONDS

say() { printf '\n==> [e2e %3ds] %s\n' "$((SECONDS - started))" "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
fail() {
    printf '\nFAIL: %s\n' "$*" >&2
    exit 1
}

# --- tools ---------------------------------------------------------------
say "control-plane binaries (built once into ~/.cache/pipewright)"
rc=0
bin=$("$e2e/build.sh" | tail -1) || rc=$?
if [[ $rc -eq 3 ]]; then
    echo "SKIP: the end-to-end tests need the Go toolchain to build Kubernetes" >&2
    exit 0
fi
[[ $rc -eq 0 ]] || fail "e2e/build.sh failed ($rc)"
export PATH="$bin:$PATH"
for tool in openssl curl python3; do
    command -v "$tool" >/dev/null || fail "$tool is needed"
done
# The project's Python environment (PyYAML reads the chart's renders).
py=$(bash "$repo/scripts/python-env.sh" | tail -1) || fail "scripts/python-env.sh failed"
command -v prometheus >/dev/null || fail "prometheus is needed (bash scripts/system-deps.sh)"

say "operator binary"
# PIPEWRIGHT_OPERATOR_BIN runs a given binary instead of building this tree's.
operator_bin=${PIPEWRIGHT_OPERATOR_BIN:-}
if [[ -z $operator_bin ]]; then
    nice -n 10 cargo build --release --quiet -p pipewright-operator
    operator_bin=$repo/target/release/pipewright-operator
fi
[[ -x $operator_bin ]] || fail "no $operator_bin"

work=$(mktemp -d "${TMPDIR:-/tmp}/pipewright-e2e.XXXXXX")
declare -A op_pid=()
kubelet_pid=
# Other processes the scenarios start (Prometheus and its target writer).
bg_pids=()
cleanup() {
    local rc=$? pid
    for pid in "${bg_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $kubelet_pid ]]; then
        kill "$kubelet_pid" 2>/dev/null || true
        wait "$kubelet_pid" 2>/dev/null || true
    fi
    for pid in "${op_pid[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ $rc -ne 0 && -n ${KUBECONFIG:-} ]]; then
        printf '\n--- pods, runs and events at the failure ---\n' >&2
        kubectl get pods -A -o wide >&2 2>&1 || true
        kubectl get trainingruns -A -o jsonpath='{range .items[*]}{.metadata.name}: {.status}{"\n"}{end}' >&2 2>&1 || true
        kubectl get events -n "$run_ns" >&2 2>&1 || true
    fi
    if [[ $rc -ne 0 && -d $work ]]; then
        for log in "$work/"operator-*.log "$work/cluster/logs/"*.log "$work/train/"*.log "$work/train/pods/"*.log \
            "$work/prometheus/"*.log; do
            [[ -f $log ]] || continue
            printf '\n--- last lines of %s ---\n' "${log#"$work"/}" >&2
            tail -n 15 "$log" >&2
        done
    fi
    "$e2e/cluster.sh" down "$work/cluster" || true
    [[ ${E2E_KEEP:-0} == 1 ]] || rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Polls `$@` until it succeeds; fails the test after $1 seconds.
eventually() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "$what (not within ${seconds}s)"
        sleep 0.2
    done
}

chart=$repo/charts/pipewright
release=pipewright
system_ns=pipewright-system
run_ns=e2e
run="e2e-run"

# --- chart ---------------------------------------------------------------
say "chart: CRD, lint, template, values schema"
# The chart's CRD is a link to the generated one, so there is one definition.
cmp -s "$chart/crds/trainingruns.pipewright.dev.yaml" crds/trainingruns.pipewright.dev.yaml ||
    fail "charts/pipewright/crds/trainingruns.pipewright.dev.yaml differs from crds/trainingruns.pipewright.dev.yaml"
"$operator_bin" crd | cmp -s - crds/trainingruns.pipewright.dev.yaml ||
    fail "crds/trainingruns.pipewright.dev.yaml is not what '$operator_bin crd' prints; regenerate it"
ok "the chart's CRD is crds/trainingruns.pipewright.dev.yaml, and the operator's own"
helm lint --strict "$chart" >"$work/lint.log" 2>&1 || { cat "$work/lint.log"; fail "helm lint"; }
helm lint --strict "$chart" --set serviceMonitor.enabled=true --set grafanaDashboard.enabled=true \
    >"$work/lint.log" 2>&1 || { cat "$work/lint.log"; fail "helm lint (all features on)"; }
ok "helm lint --strict"
# (helm notes on stderr that the CRD is a link; the notes go to helm.log.)
helm template "$release" "$chart" -n "$system_ns" --kube-version "$KUBERNETES_VERSION" \
    >"$work/default.yaml" 2>>"$work/helm.log" || fail "helm template: $(cat "$work/helm.log")"
kinds() { sed -n 's/^kind: //p' "$1" | sort | tr '\n' ' '; }
[[ $(kinds "$work/default.yaml") == "ClusterRole ClusterRoleBinding Deployment Role RoleBinding Service ServiceAccount " ]] ||
    fail "default render has kinds: $(kinds "$work/default.yaml")"
helm template "$release" "$chart" -n "$system_ns" --kube-version "$KUBERNETES_VERSION" \
    --set serviceMonitor.enabled=true --set grafanaDashboard.enabled=true \
    >"$work/full.yaml" 2>>"$work/helm.log" || fail "helm template: $(cat "$work/helm.log")"
grep -q '^kind: ServiceMonitor' "$work/full.yaml" || fail "serviceMonitor.enabled renders no ServiceMonitor"
grep -q '^kind: PodMonitor' "$work/full.yaml" || fail "serviceMonitor.enabled renders no PodMonitor for the runs"
grep -q 'grafana_dashboard: "1"' "$work/full.yaml" || fail "the dashboard ConfigMap lacks grafana_dashboard: \"1\""
python3 scripts/dashboards.py --check || fail "the chart's dashboards are not what scripts/dashboards.py writes"
"$py" - "$work/full.yaml" "$chart/dashboards" <<'EOF' || fail "the dashboards ConfigMap"
import json, os, sys, yaml
maps = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "ConfigMap"]
shipped = {n: json.load(open(os.path.join(sys.argv[2], n))) for n in os.listdir(sys.argv[2])}
data = {k: json.loads(v) for m in maps for k, v in m["data"].items()}
assert data == shipped, f"the ConfigMap holds {sorted(data)}, the chart ships {sorted(shipped)}"
assert len(shipped) == 6, sorted(shipped)
EOF
ok "helm template: default objects; ServiceMonitor, PodMonitor and the 6 dashboards when enabled"
# Bad values are refused before anything reaches the cluster.
refused_value() {
    local expect=$1
    shift
    local out
    if out=$(helm template "$release" "$chart" --kube-version "$KUBERNETES_VERSION" "$@" 2>&1); then
        fail "helm template $* was accepted"
    fi
    grep -qF -- "$expect" <<<"$out" || fail "helm template $*: message lacks '$expect': $out"
}
refused_value gpusPerShard --set gpusPerShard=-1
refused_value gpusPerShard --set-string gpusPerShard=lots
refused_value replicaCount --set replicaCount=0
refused_value colour --set colour=blue
refused_value pullPolicy --set image.pullPolicy=Sometimes
refused_value leaderElection --set replicaCount=2 --set leaderElection.enabled=false
ok "values schema refuses bad values, naming them"

# --- cluster -------------------------------------------------------------
say "cluster up"
"$e2e/cluster.sh" up "$work/cluster"
# shellcheck disable=SC1091
source "$work/cluster/env"
k() { kubectl "$@"; }
ok "$(k get nodes -l type=kwok --no-headers | wc -l) nodes"

# --- traces: a real Jaeger (all-in-one, in memory) on free loopback ports --
# The chart gives the operator its OTLP endpoint; the operator passes it to
# the run's pods (checked in the train scenario by e2e/traces.py).
jaeger_bin=$(bash "$e2e/jaeger.sh" | tail -n 1) || fail "e2e/jaeger.sh could not build Jaeger"
read -r jaeger_otlp jaeger_query jaeger_grpc <<<"$(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')"
mkdir -p "$work/jaeger"
cat >"$work/jaeger/config.yaml" <<JAEGER
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces: {receivers: [otlp], processors: [batch], exporters: [jaeger_storage_exporter]}
  telemetry: {metrics: {level: none}}
extensions:
  jaeger_storage: {backends: {memstore: {memory: {max_traces: 100000}}}}
  jaeger_query:
    storage: {traces: memstore}
    http: {endpoint: "127.0.0.1:$jaeger_query"}
    grpc: {endpoint: "127.0.0.1:$jaeger_grpc"}
receivers:
  otlp: {protocols: {http: {endpoint: "127.0.0.1:$jaeger_otlp"}}}
processors:
  batch: {}
exporters:
  jaeger_storage_exporter: {trace_storage: memstore}
JAEGER
"$jaeger_bin" --config "$work/jaeger/config.yaml" >"$work/jaeger/jaeger.log" 2>&1 &
bg_pids+=($!)
eventually 30 "Jaeger's query API on 127.0.0.1:$jaeger_query" curl -sf "http://127.0.0.1:$jaeger_query/api/services"
ok "Jaeger ($jaeger_bin): OTLP/HTTP on 127.0.0.1:$jaeger_otlp, query API on 127.0.0.1:$jaeger_query"
# --- end traces ----------------------------------------------------------

# --- install -------------------------------------------------------------
say "install: helm install, operator as the chart's ServiceAccount"
if helm install bad "$chart" -n "$system_ns" --create-namespace --set gpusPerShard=many \
    >"$work/bad-install.log" 2>&1; then
    fail "helm install with gpusPerShard=many succeeded"
fi
grep -q gpusPerShard "$work/bad-install.log" || fail "bad install: $(cat "$work/bad-install.log")"
ok "helm install with a bad value fails, naming it"
helm install "$release" "$chart" -n "$system_ns" --create-namespace \
    --set workerImage.tag=e2e --set gpusPerShard=2 --set tracing.otlpEndpoint="http://127.0.0.1:$jaeger_otlp" \
    --wait --timeout 90s >"$work/install.log" 2>&1 ||
    { cat "$work/install.log"; fail "helm install"; }
k get crd trainingruns.pipewright.dev >/dev/null || fail "helm install did not create the CRD"
eventually 30 "the CRD is established" \
    k wait --for condition=established --timeout=1s crd/trainingruns.pipewright.dev
k get deploy "$release" -n "$system_ns" >/dev/null || fail "the release has no Deployment $release"
eventually 60 "the operator Deployment available (under kwok)" \
    k wait --for condition=available --timeout=1s deploy/"$release" -n "$system_ns"
python3 - <(k get deploy "$release" -n "$system_ns" -o json) <<'EOF' || fail "the operator Deployment"
import json, sys
d = json.load(open(sys.argv[1]))
pod = d["spec"]["template"]["spec"]
c = pod["containers"][0]
assert pod["securityContext"]["runAsNonRoot"] is True, "runAsNonRoot"
assert c["securityContext"]["readOnlyRootFilesystem"] is True, "readOnlyRootFilesystem"
assert c["securityContext"]["allowPrivilegeEscalation"] is False, "allowPrivilegeEscalation"
assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness probe"
assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe"
assert pod["serviceAccountName"] == d["metadata"]["name"], "service account"
EOF
ok "release installed; Deployment $release available, non-root, read-only root, probed"

sa="system:serviceaccount:$system_ns:$release"
can() { k auth can-i --as "$sa" "$@" 2>/dev/null || true; }
for check in "create pods -n $run_ns" "patch trainingruns.pipewright.dev --subresource=status -n $run_ns" \
    "update trainingruns.pipewright.dev --subresource=finalizers -n $run_ns" "patch secrets -n $run_ns" \
    "watch trainingruns.pipewright.dev -A" "create secrets -n $run_ns" "list nodes" \
    "create events.events.k8s.io -n $run_ns" "create poddisruptionbudgets.policy -n $run_ns" \
    "delete trainingruns.pipewright.dev -n $run_ns" \
    "update leases.coordination.k8s.io -n $system_ns"; do
    # shellcheck disable=SC2086
    [[ $(can $check) == yes ]] || fail "the operator's ServiceAccount cannot $check"
done
for check in "delete nodes" "list secrets -n $run_ns" "create deployments.apps -n $run_ns" \
    "update leases.coordination.k8s.io -n $run_ns" \
    "create clusterrolebindings.rbac.authorization.k8s.io"; do
    # shellcheck disable=SC2086
    [[ $(can $check) == no ]] || fail "the operator's ServiceAccount may $check; it should not"
done
ok "RBAC: the ServiceAccount may do what the operator needs and no more"

# A kubeconfig holding a token of the chart's ServiceAccount.
token=$(k create token "$release" -n "$system_ns" --duration 2h)
cat >"$work/operator.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {server: "$E2E_API_SERVER", certificate-authority: "$E2E_CA"}
users:
- name: operator
  user: {token: "$token"}
contexts:
- name: e2e
  context: {cluster: e2e, user: operator, namespace: $system_ns}
current-context: e2e
EOF
# Operator replicas run the binary with the Deployment's own arguments and
# environment (ports moved to free local ones), so the chart and the binary
# must agree.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
s = [socket.socket() for _ in range(int(sys.argv[1]))]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))
EOF
}
k get deploy "$release" -n "$system_ns" -o json >"$work/deployment.json"
python3 - "$work/deployment.json" "$work/operator.cmd" <<'EOF'
import json, shlex, sys
d = json.load(open(sys.argv[1]))
c = d["spec"]["template"]["spec"]["containers"][0]
port = {p["name"]: str(p["containerPort"]) for p in c["ports"]}
local = {port["metrics"]: "@METRICS@", port["health"]: "@HEALTH@"}
args = []
for a in c.get("args", []):
    for remote, mine in local.items():
        a = a.replace("0.0.0.0:" + remote, "127.0.0.1:" + mine)
    args.append(a)
env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
env["POD_NAMESPACE"] = d["metadata"]["namespace"]
with open(sys.argv[2], "w") as f:
    for name, value in env.items():
        f.write(f"export {name}={shlex.quote(value)}\n")
    f.write("args=(" + " ".join(shlex.quote(a) for a in args) + ")\n")
EOF
for flag in --leader-elect --metrics-addr --health-addr; do
    grep -q -- "$flag" "$work/operator.cmd" || fail "the Deployment does not pass $flag"
done
# Cluster DNS names (a run's coordinator Service) resolve through
# /etc/hosts: each operator replica runs in its own mount namespace, where
# $work/hosts, kept up to date by e2e/kubelet.py, is bind-mounted over
# /etc/hosts. Nothing outside those namespaces sees it.
cp /etc/hosts "$work/hosts"
if [[ $(id -u) -eq 0 ]]; then
    own_hosts=(unshare --mount --propagation private --)
else
    own_hosts=(unshare --user --map-root-user --mount --propagation private --)
fi
# shellcheck disable=SC2016 # expanded by that sh
"${own_hosts[@]}" sh -c 'mount --bind "$0" /etc/hosts' "$work/hosts" 2>"$work/unshare.log" ||
    fail "the operator needs its own /etc/hosts: '${own_hosts[*]}' and mount --bind failed: $(cat "$work/unshare.log")"
declare -A op_metrics=() op_health=()
# Starts operator replica $1; its identity (POD_NAME) is $release-$1.
start_operator() {
    local id=$1 metrics health
    read -r metrics health <<<"$(free_ports 2)"
    (
        # shellcheck disable=SC1091
        source "$work/operator.cmd"
        export KUBECONFIG=$work/operator.kubeconfig RUST_LOG="${RUST_LOG:-info}"
        export POD_NAME=$release-$id
        mine=()
        # shellcheck disable=SC2154 # args comes from operator.cmd
        for arg in "${args[@]}"; do
            arg=${arg//@METRICS@/$metrics}
            mine+=("${arg//@HEALTH@/$health}")
        done
        # shellcheck disable=SC2016 # expanded by that sh
        exec "${own_hosts[@]}" sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' \
            "$work/hosts" "$operator_bin" "${mine[@]}"
    ) >"$work/operator-$id.log" 2>&1 &
    op_pid[$id]=$!
    op_metrics[$id]=$metrics
    op_health[$id]=$health
}
# Stops operator replica $1 with SIGTERM; it must exit 0 within 15 s.
stop_operator() {
    local id=$1 pid=${op_pid[$1]} rc=0 deadline=$((SECONDS + 15))
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do
        ((SECONDS < deadline)) || fail "operator $id did not stop within 15 s of SIGTERM"
        sleep 0.2
    done
    wait "$pid" || rc=$?
    unset "op_pid[$id]"
    [[ $rc -eq 0 ]] || fail "operator $id exited with $rc on SIGTERM"
}
lease_holder() {
    k get lease "$release" -n "$system_ns" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null
}
holds_lease() { [[ $(lease_holder) == "$release-$1" ]]; }

start_operator a
sleep 1
kill -0 "${op_pid[a]}" 2>/dev/null || fail "the operator exited: $(cat "$work/operator-a.log")"
eventually 30 "operator /readyz" curl -sf "http://127.0.0.1:${op_health[a]}/readyz"
curl -sf "http://127.0.0.1:${op_health[a]}/healthz" >/dev/null || fail "operator /healthz"
curl -sf "http://127.0.0.1:${op_metrics[a]}/metrics" >/dev/null || fail "operator /metrics"
eventually 15 "operator a holds the leader lease (holder: $(lease_holder))" holds_lease a
ok "operator running as $sa: healthy, ready, serving metrics, leader"

# --- place ---------------------------------------------------------------
say "place: a 3-stage x 2-replica run"
k create namespace "$run_ns" >/dev/null
eventually 30 "default ServiceAccount in $run_ns" k get serviceaccount default -n "$run_ns"
k apply -n "$run_ns" -f "$e2e/manifests/run.yaml" >/dev/null
shards=6
sel="pipewright.dev/run=$run,pipewright.dev/role=shard"
count_pods() {
    [[ $(k get pods -n "$run_ns" -l "$1" --no-headers 2>/dev/null | grep -c Running) -eq $2 ]]
}
eventually 30 "coordinator pod Running" count_pods "pipewright.dev/run=$run,pipewright.dev/role=coordinator" 1
eventually 30 "$shards shard pods Running" count_pods "$sel" "$shards"
for stage in 0 1 2; do
    for replica in 0 1; do
        k get pod -n "$run_ns" "$run-s$stage-r$replica" >/dev/null 2>&1 ||
            fail "no pod $run-s$stage-r$replica"
    done
done
ok "coordinator $run-coordinator and shard pods $run-s{0,1,2}-r{0,1}"
k get pods -n "$run_ns" -l "$sel" -o json >"$work/shards.json"
python3 - "$work/shards.json" <<'EOF' || fail "shard pod placement"
import json, sys
pods = json.load(open(sys.argv[1]))["items"]
by_stage = {}
for p in pods:
    name = p["metadata"]["name"]
    c = p["spec"]["containers"][0]
    req = c.get("resources", {}).get("requests", {})
    assert req.get("nvidia.com/gpu") == "2", f"{name} requests {req}, not 2 nvidia.com/gpu"
    owner = p["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "TrainingRun" and owner["controller"], f"{name} owner {owner}"
    by_stage.setdefault(p["metadata"]["labels"]["pipewright.dev/stage"], []).append(p["spec"]["nodeName"])
for stage, nodes in sorted(by_stage.items()):
    assert len(set(nodes)) == len(nodes), f"stage {stage} replicas share a node: {nodes}"
    print(f"    stage {stage}: {', '.join(sorted(nodes))}")
EOF
gpus_shown() { [[ $(k get tr "$run" -n "$run_ns" -o jsonpath='{.status.gpusPerShard}') == 2 ]]; }
eventually 15 "status.gpusPerShard (kubectl describe) says 2" gpus_shown
ok "each shard requests 2 nvidia.com/gpu, and status.gpusPerShard says so; replicas of a stage are on distinct nodes"
for child in "service/$run-shards" "service/$run-coordinator" "configmap/$run-manifest" "secret/$run-key"; do
    k get -n "$run_ns" "$child" >/dev/null || fail "no $child"
done
ok "headless shard service, coordinator service, manifest, key"
phase() { k get tr "$run" -n "$run_ns" -o jsonpath='{.status.phase}'; }
is_phase() { [[ $(phase) == "$1" ]]; }
eventually 30 "run phase Running (is $(phase))" is_phase Running
# (Not `| head -1`: with pipefail, kubectl dying of SIGPIPE would fail the test.)
listing=$(k get tr -n "$run_ns")
header=${listing%%$'\n'*}
for column in NAME PHASE STAGES REPLICAS READY STEP LOSS TOKENS/S AGE; do
    grep -qw -- "$column" <<<"$header" || fail "kubectl get tr lacks column $column: $header"
done
row=$(k get trainingruns -n "$run_ns" --no-headers "$run")
read -r -a cells <<<"$row"
[[ ${cells[1]} == Running && ${cells[2]} == 3 && ${cells[3]} == 2 && ${cells[4]} == 6 ]] ||
    fail "kubectl get tr row: $row"
printf '    %s\n    %s\n' "$header" "$row"
ok "kubectl get tr shows phase, stages, replicas, ready shards"

# --- refuse --------------------------------------------------------------
say "refuse: malformed manifests"
refused=0
for manifest in "$e2e"/manifests/bad/*.yaml; do
    name=$(basename "$manifest" .yaml)
    expect=$(sed -n 's/^# expect: //p' "$manifest")
    [[ -n $expect ]] || fail "$manifest has no '# expect:' line"
    if out=$(k create -n "$run_ns" -f "$manifest" 2>&1); then
        fail "$name was accepted: $out"
    fi
    IFS=';' read -r -a needles <<<"$expect"
    for needle in "${needles[@]}"; do
        grep -qF -- "$needle" <<<"$out" || fail "$name: the refusal does not say '$needle': $out"
    done
    refused=$((refused + 1))
done
((refused >= 10)) || fail "only $refused malformed manifests"
[[ $(k get tr -n "$run_ns" --no-headers | wc -l) -eq 1 ]] || fail "a malformed run was stored"
ok "$refused malformed manifests refused, each naming its field"

# --- replace -------------------------------------------------------------
say "replace: deleted and failed shard pods"
# The live (not terminating) pod of shard (stage $1, replica $2): "name uid node".
shard_pod() {
    k get pods -n "$run_ns" -l "$sel,pipewright.dev/stage=$1,pipewright.dev/replica=$2" \
        -o jsonpath='{range .items[*]}{.metadata.name} {.metadata.uid} {.spec.nodeName} {.status.phase} {.metadata.deletionTimestamp}{"\n"}{end}' |
        awk 'NF == 4 { print $1, $2, $3, $4 }'
}
# Succeeds once shard ($1, $2) has a Running pod other than uid $3.
replaced() {
    local pod
    pod=$(shard_pod "$1" "$2")
    [[ -n $pod && $pod != *" $3 "* && $pod == *" Running" ]]
}
# Prints the reason recorded in the status for a move away from pod $1.
moved_reason() {
    k get tr "$run" -n "$run_ns" \
        -o jsonpath='{range .status.reassignments[*]}{.fromPod} {.reason}{"\n"}{end}' |
        awk -v pod="$1" '$1 == pod { print $2 }' | tail -1
}
recorded() { [[ -n $(moved_reason "$1") ]]; }

read -r victim old_uid old_node _ <<<"$(shard_pod 1 0)"
[[ -n $victim ]] || fail "no live pod for shard (1, 0)"
t0=$(date +%s%N)
k delete pod -n "$run_ns" "$victim" --wait=false >/dev/null
eventually 5 "a Running replacement for deleted pod $victim" replaced 1 0 "$old_uid"
ms=$((($(date +%s%N) - t0) / 1000000))
read -r new_pod _ new_node _ <<<"$(shard_pod 1 0)"
ok "deleted $victim ($old_node) -> $new_pod ($new_node) Running after ${ms} ms"
eventually 10 "the move of $victim recorded in status.reassignments" recorded "$victim"
ok "status.reassignments records $victim ($(moved_reason "$victim"))"
eventually 10 "an event about the move of $victim" \
    grep -q "$victim" < <(k get events -n "$run_ns" --field-selector "involvedObject.name=$run" -o jsonpath='{.items[*].message}')
ok "an event on the run names $victim"

read -r victim old_uid old_node _ <<<"$(shard_pod 2 1)"
k patch pod -n "$run_ns" "$victim" --subresource status --type merge \
    -p '{"status":{"phase":"Failed","reason":"Evicted","message":"failed on purpose by the e2e tests"}}' >/dev/null
t0=$(date +%s%N)
eventually 10 "a Running replacement for failed pod $victim" replaced 2 1 "$old_uid"
ms=$((($(date +%s%N) - t0) / 1000000))
read -r new_pod _ new_node _ <<<"$(shard_pod 2 1)"
ok "failed $victim ($old_node) -> $new_pod ($new_node) Running after ${ms} ms"
eventually 10 "the move of $victim recorded in status.reassignments" recorded "$victim"
[[ $(moved_reason "$victim") == Evicted ]] || fail "$victim moved for $(moved_reason "$victim"), not Evicted"
ok "status.reassignments records $victim (Evicted)"

# A worker the coordinator quarantined exits with code 3 and a termination
# message starting "quarantined:"; kwok runs no container, so the pod's
# status says so here, as the kubelet would write it.
read -r victim old_uid old_node _ <<<"$(shard_pod 1 1)"
[[ -n $victim ]] || fail "no live pod for shard (1, 1)"
k patch pod -n "$run_ns" "$victim" --subresource status --type merge -p '{"status":{"phase":"Failed",
    "containerStatuses":[{"name":"worker","image":"pipewright","imageID":"","ready":false,"restartCount":0,
    "state":{"terminated":{"exitCode":3,"reason":"Error",
    "message":"quarantined: failed_audit at step 7 (stage 1, replica 1)"}}}]}}' >/dev/null
eventually 10 "a Running replacement for quarantined pod $victim" replaced 1 1 "$old_uid"
read -r new_pod _ new_node _ <<<"$(shard_pod 1 1)"
eventually 10 "the move of $victim recorded in status.reassignments" recorded "$victim"
[[ $(moved_reason "$victim") == FailedValidation ]] ||
    fail "$victim moved for $(moved_reason "$victim"), not FailedValidation"
quarantine_event() {
    k get events -n "$run_ns" --field-selector "involvedObject.name=$run,reason=ShardQuarantined" \
        -o jsonpath='{.items[*].message}' | grep -q "pod $victim failed validation: quarantined: failed_audit at step 7"
}
eventually 10 "a ShardQuarantined event naming $victim and its termination message" quarantine_event
ok "quarantined $victim ($old_node) -> $new_pod ($new_node): FailedValidation in status.reassignments, a ShardQuarantined event"
eventually 15 "run back to Running (is $(phase))" is_phase Running
eventually 15 "$shards shard pods Running" count_pods "$sel" "$shards"

if true; then
    curl -sf "http://127.0.0.1:${op_metrics[a]}/metrics" >"$work/metrics.txt" || fail "operator /metrics"
    python3 - "$work/metrics.txt" "$chart/dashboards/pipewright-operator.json" <<'EOF' || fail "operator metrics"
import json, re, sys
text = open(sys.argv[1]).read()
def value(name, labels=""):
    m = re.search(r"^" + re.escape(name + labels) + r" (\S+)$", text, re.M)
    assert m, f"/metrics has no {name}{labels}"
    return float(m.group(1))
assert value("pipewright_operator_reconciles_total") > 0, "no reconcile counted"
assert value("pipewright_operator_shard_reassignments_total") >= 1, "the move was not counted"
assert value("pipewright_operator_runs", '{phase="Running"}') == 1, "runs by phase"
# Every operator metric the dashboard plots exists.
d = json.load(open(sys.argv[2]))
exprs = " ".join(t["expr"] for p in d["panels"] for t in p.get("targets", []))
for name in set(re.findall(r"pipewright_operator_[a-z_]+", exprs)):
    base = re.sub(r"_(bucket|count|sum)$", "", name)
    assert re.search(r"^" + re.escape(base), text, re.M), f"the dashboard plots {name}; /metrics lacks it"
EOF
    ok "/metrics counts reconciles, the move, runs by phase; every operator metric the dashboard plots exists"
fi

# --- node lost -----------------------------------------------------------
say "node lost: a shard's node stops reporting Ready"
read -r victim old_uid old_node _ <<<"$(shard_pod 0 1)"
# kwok stops playing the node's kubelet, and the node reports NotReady.
k annotate node "$old_node" kwok.x-k8s.io/node- >/dev/null
k patch node "$old_node" --subresource status --type strategic \
    -p '{"status":{"conditions":[{"type":"Ready","status":"False","reason":"KubeletStopped","message":"stopped by the e2e tests"}]}}' >/dev/null
t0=$(date +%s%N)
eventually 15 "a Running replacement for $victim, whose node $old_node is NotReady" replaced 0 1 "$old_uid"
ms=$((($(date +%s%N) - t0) / 1000000))
read -r new_pod _ new_node _ <<<"$(shard_pod 0 1)"
[[ $new_node != "$old_node" ]] || fail "the replacement of $victim is on the NotReady node $old_node"
ok "$victim on NotReady $old_node -> $new_pod ($new_node) Running after ${ms} ms"
eventually 10 "the move of $victim recorded in status.reassignments" recorded "$victim"
ok "status.reassignments records $victim ($(moved_reason "$victim"))"
node_ready() {
    [[ $(k get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}') == True ]]
}
# The node comes back: kwok plays it again and finishes its terminating pods.
k annotate node "$old_node" kwok.x-k8s.io/node=fake >/dev/null
eventually 30 "$old_node Ready again" node_ready "$old_node"
eventually 15 "run back to Running (is $(phase))" is_phase Running

# --- suspend -------------------------------------------------------------
say "suspend: the pods go, everything else stays; resuming brings them back"
live_pods() {
    k get pods -n "$run_ns" -l "pipewright.dev/run=$run" \
        -o jsonpath='{range .items[*]}{.metadata.name} {.metadata.deletionTimestamp}{"\n"}{end}' |
        awk 'NF == 1' | wc -l
}
no_live_pods() { [[ $(live_pods) -eq 0 ]]; }
k patch tr "$run" -n "$run_ns" --type merge -p '{"spec":{"suspend":true}}' >/dev/null
eventually 15 "phase Suspended (is $(phase))" is_phase Suspended
eventually 15 "no pods of the suspended run ($(live_pods) left)" no_live_pods
for child in "service/$run-shards" "service/$run-coordinator" "configmap/$run-manifest" "secret/$run-key"; do
    k get -n "$run_ns" "$child" >/dev/null || fail "suspending deleted $child"
done
ok "suspended: no pods; services, manifest and key kept"
k patch tr "$run" -n "$run_ns" --type merge -p '{"spec":{"suspend":false}}' >/dev/null
eventually 20 "$shards shard pods Running after resuming" count_pods "$sel" "$shards"
eventually 10 "coordinator Running after resuming" count_pods "pipewright.dev/run=$run,pipewright.dev/role=coordinator" 1
eventually 15 "phase Running after resuming (is $(phase))" is_phase Running
ok "resumed: coordinator and $shards shard pods Running"

# --- failover ------------------------------------------------------------
say "failover: a standby operator takes over when the leader stops"
start_operator b
eventually 30 "operator b /healthz" curl -sf "http://127.0.0.1:${op_health[b]}/healthz"
sleep 2
holds_lease a || fail "the lease moved to $(lease_holder) while operator a runs"
ok "operator b runs as a standby; a keeps the lease"
stop_operator a
! holds_lease a || fail "operator a still holds the lease after stopping"
ok "operator a stopped cleanly on SIGTERM and released the lease"
t0=$(date +%s%N)
eventually 20 "operator b takes the lease (holder: $(lease_holder))" holds_lease b
ok "operator b leads after $((($(date +%s%N) - t0) / 1000000)) ms"
read -r victim old_uid old_node _ <<<"$(shard_pod 2 0)"
k delete pod -n "$run_ns" "$victim" --wait=false >/dev/null
eventually 10 "operator b replaces deleted pod $victim" replaced 2 0 "$old_uid"
ok "operator b replaced $victim"

# --- delete --------------------------------------------------------------
say "delete: the run and everything it owns"
k delete tr -n "$run_ns" "$run" --wait=false >/dev/null
leftovers() {
    k get pods,services,configmaps,secrets,poddisruptionbudgets -n "$run_ns" \
        -l "pipewright.dev/run=$run" --no-headers 2>/dev/null
}
none_left() { [[ -z $(leftovers) ]]; }
# The garbage collector notices a new kind (the CRD installed a minute ago)
# at its next discovery resync, every 30 s; allow for that.
eventually 60 "children of the deleted run gone: $(leftovers | awk '{print $1}' | tr '\n' ' ')" none_left
ok "no pod, service, config map, secret or disruption budget of $run remains"

kill -0 "${op_pid[b]}" 2>/dev/null || fail "operator b died during the tests"

# --- train ---------------------------------------------------------------
say "train: a 2-stage x 2-replica run trains for real, its pods played by local processes"
train="e2e-train"
mkdir -p "$work/train"
# A corpus of made-up sentences (byte-level tokens need no vocabulary).
python3 - "$work/train/corpus.txt" <<'EOF'
import random, sys
rng = random.Random(7)
words = ("the a pipeline stage replica shard trains model on many machines while "
         "gradients flow back and activations move forward every step loss falls").split()
with open(sys.argv[1], "w") as f:
    for _ in range(6000):
        f.write(" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))).capitalize() + ".\n")
EOF
# A real Prometheus scrapes what the chart's monitors select: the operator
# (through its Service) and the run's coordinator and shard pods (port
# `metrics`), each pod at the address its process has here.
mkdir -p "$work/prometheus/targets"
"$py" "$e2e/prometheus.py" config --rendered "$work/full.yaml" --dir "$work/prometheus/targets" \
    --out "$work/prometheus/prometheus.yml"
"$py" "$e2e/prometheus.py" targets --rendered "$work/full.yaml" --dir "$work/prometheus/targets" \
    --addresses "$work/train/addresses" --serve "$system_ns/$release-metrics=127.0.0.1:${op_metrics[b]}" \
    --loop >"$work/prometheus/targets.log" 2>&1 &
bg_pids+=($!)
read -r prom_port <<<"$(free_ports 1)"
prometheus --config.file "$work/prometheus/prometheus.yml" --storage.tsdb.path "$work/prometheus/data" \
    --web.listen-address "127.0.0.1:$prom_port" >"$work/prometheus/prometheus.log" 2>&1 &
bg_pids+=($!)
eventually 30 "Prometheus ready on 127.0.0.1:$prom_port" curl -sf "http://127.0.0.1:$prom_port/-/ready"
ok "Prometheus $(prometheus --version 2>&1 | awk 'NR == 1 { print $3 }') scraping the chart's monitors' targets"
sed "s|@CORPUS@|$work/train/corpus.txt|" "$e2e/manifests/train.yaml" | k apply -n "$run_ns" -f - >/dev/null
# PIPEWRIGHT_BIN runs a given pipewright binary instead of this tree's.
pipewright_bin=${PIPEWRIGHT_BIN:-$repo/target/release/pipewright}
[[ -x $pipewright_bin ]] || fail "no $pipewright_bin (cargo build --release -p pipewright)"
# Every pod kwok marks Running runs here, with its spec's args and env.
python3 "$e2e/kubelet.py" --namespace "$run_ns" --run "$train" --binary "$pipewright_bin" \
    --dir "$work/train" --hosts "$work/hosts" >"$work/train/kubelet.log" 2>&1 &
kubelet_pid=$!
eventually 30 "coordinator and 4 shard pods of $train Running" count_pods "pipewright.dev/run=$train" 5
coordinator_addr() {
    [[ -f $work/train/addresses ]] || return 0
    awk -v pod="$train-coordinator" '$1 == pod { print $2 }' "$work/train/addresses"
}
coordinator_up() { curl -sf "http://$(coordinator_addr):7070/healthz"; }
eventually 15 "the coordinator of $train answers" coordinator_up
ok "5 processes started with their pods' args and env (coordinator at $(coordinator_addr):7070)"
# Until the run is over: what `kubectl get tr` shows, and the coordinator's
# own phase (it serves /status for 2 s after the last step, then exits).
declare -A seen_steps=() seen_losses=()
coordinator_phase="" coordinator_step=""
# The last moment the coordinator was seen training, past step 40: the
# dashboards' queries are run at that instant (the run's series go stale
# once its pods stop).
training_at=""
deadline=$((SECONDS + 120))
t0=$SECONDS
while :; do
    status=$(curl -sf --max-time 1 "http://$(coordinator_addr):7070/status" || true)
    if [[ -n $status ]]; then
        read -r coordinator_phase coordinator_step < <(python3 -c '
import json, sys
s = json.load(sys.stdin)
print(s["phase"], s["step"])' <<<"$status")
        if [[ $coordinator_phase == Training && $coordinator_step -ge 40 ]]; then
            training_at=$(date +%s.%N)
        fi
    fi
    # NAME PHASE STAGES REPLICAS READY STEP LOSS TOKENS/S AGE
    read -r -a cells <<<"$(k get tr "$train" -n "$run_ns" --no-headers)"
    if [[ ${#cells[@]} -ge 9 && ${cells[5]} =~ ^[0-9]+$ && ${cells[5]} -gt 0 ]]; then
        [[ -n ${seen_steps[${cells[5]}]:-} ]] || printf '    kubectl get tr: %s\n' "${cells[*]}"
        seen_steps[${cells[5]}]=1
        seen_losses[${cells[6]}]=1
    fi
    # Over once the run is, and the coordinator said so or has stopped.
    if [[ ${cells[1]} == Succeeded || ${cells[1]} == Failed ]]; then
        [[ $coordinator_phase == Succeeded || -z $status ]] && break
    fi
    ((SECONDS < deadline)) || fail "$train did not finish within 120 s (kubectl get tr: ${cells[*]})"
    sleep 0.3
done
[[ ${cells[1]} == Succeeded ]] ||
    fail "$train ended ${cells[1]}: $(k get tr "$train" -n "$run_ns" -o jsonpath='{.status.conditions}')"
ok "run phase Succeeded $((SECONDS - t0)) s after the processes started"
[[ $coordinator_phase == Succeeded ]] || fail "the coordinator's last /status phase was '$coordinator_phase', not Succeeded"
[[ $coordinator_step == 100 ]] || fail "the coordinator ended at step $coordinator_step, not 100"
ok "the coordinator's /status said Succeeded at step 100"
steps=$(tr ' ' '\n' <<<"${!seen_steps[*]}" | sort -n | tr '\n' ' ')
((${#seen_steps[@]} >= 2)) || fail "kubectl get tr showed step(s) $steps only; the step should move while training"
((${#seen_losses[@]} >= 2)) || fail "kubectl get tr showed loss(es) ${!seen_losses[*]} only; the loss should move"
ok "kubectl get tr showed steps ${steps}and ${#seen_losses[@]} distinct losses"
coordinator_pod_done() {
    [[ $(k get pod "$train-coordinator" -n "$run_ns" -o jsonpath='{.status.phase}') == Succeeded ]]
}
eventually 10 "the coordinator process exits 0 (its pod Succeeded)" coordinator_pod_done
ok "the coordinator process exited 0"
# --- traces: one step's trace holds every shard's spans under the --------
# coordinator's `step N`; the operator's reconciles of the run are there.
"$py" "$e2e/traces.py" --query "http://127.0.0.1:$jaeger_query" --run "$train" --stages 2 --replicas 2 \
    --operator >"$work/jaeger/check.log" 2>&1 || fail "traces in Jaeger:
$(cat "$work/jaeger/check.log")"
ok "traces: $(tail -n 1 "$work/jaeger/check.log")"
# --- end traces ----------------------------------------------------------
[[ -n $training_at ]] || fail "the coordinator was never seen training past step 40"
"$py" "$e2e/prometheus.py" check --prom "http://127.0.0.1:$prom_port" --dashboards "$chart/dashboards" \
    --namespace "$run_ns" --run "$train" --shards 4 --time "$training_at" >"$work/prometheus/check.log" 2>&1 ||
    fail "dashboards on the real Prometheus:
$(cat "$work/prometheus/check.log")"
ok "$(tail -n 1 "$work/prometheus/check.log")"
# The ledger's largest contributors reach the run's status: one per shard
# pod, named by its pod (and the worker's process id), shares summing to
# 100%.
contributions_ok() {
    local rows
    rows=$(k get tr "$train" -n "$run_ns" \
        -o jsonpath='{range .status.contributions[*]}{.name} {.identity} {.sharePercent}{"\n"}{end}')
    [[ $(wc -l <<<"$rows") == 4 ]] || return 1
    awk -v run="$train" '
        $1 !~ "^" run "-s[0-9]+-r[0-9]+(-a[0-9]+)?/[0-9]+$" || length($2) != 16 { bad = 1 }
        { sum += $3; seen[$2] = 1 }
        END { n = 0; for (k in seen) n++; exit !(bad == 0 && n == 4 && sum > 99.9 && sum < 100.1) }
    ' <<<"$rows"
}
eventually 10 "status.contributions lists the 4 shard pods' identities with shares summing to 100%" contributions_ok
ok "status.contributions: $(k get tr "$train" -n "$run_ns" -o jsonpath='{range .status.contributions[*]}{.name}={.sharePercent}% {end}')"
# spec.ttlSecondsAfterFinished: the operator deletes the finished run.
gone() { ! k get tr "$train" -n "$run_ns" >/dev/null 2>&1; }
finished_at=$(k get tr "$train" -n "$run_ns" -o jsonpath='{.status.completionTime}')
eventually 60 "the operator deletes $train $(sed -n 's/.*ttlSecondsAfterFinished: *\([0-9]*\).*/\1/p' \
    "$e2e/manifests/train.yaml") s after it finished (at $finished_at)" gone
ok "the operator deleted $train after its ttlSecondsAfterFinished (finished at $finished_at, gone $(date -u +%H:%M:%SZ))"
kill "$kubelet_pid"
wait "$kubelet_pid" || true
kubelet_pid=
ok "every process stopped"

# --- shutdown ------------------------------------------------------------
say "shutdown: the last operator stops; helm uninstall"
stop_operator b
! holds_lease b || fail "operator b still holds the lease after stopping"
ok "operator b stopped cleanly on SIGTERM and released the lease"
helm uninstall "$release" -n "$system_ns" --wait --timeout 60s >/dev/null
for object in "clusterrole/$release" "clusterrolebinding/$release" "deploy/$release -n $system_ns" \
    "serviceaccount/$release -n $system_ns"; do
    # shellcheck disable=SC2086
    ! k get $object >/dev/null 2>&1 || fail "$object remains after helm uninstall"
done
k get crd trainingruns.pipewright.dev >/dev/null || fail "helm uninstall removed the CRD (and every run with it)"
ok "helm uninstall removes the operator and its RBAC, keeps the CRD"
# Warnings of the operator replicas, once each, for whoever reads the log;
# events about a run already deleted are expected and left out.
sed 's/\x1b\[[0-9;]*m//g' "$work/"operator-*.log | grep -E '^\S+ +(ERROR|WARN) ' |
    grep -v 'not found in local store' | sed -E 's/^\S+ +//' | sort | uniq -c | sort -rn >"$work/warnings.log" || true
if [[ -s $work/warnings.log ]]; then
    printf '    operator warnings (count, message):\n'
    head -n 10 "$work/warnings.log" | cut -c1-300 | sed 's/^/      /'
fi
say "all end-to-end scenarios passed in $((SECONDS - started)) s"
