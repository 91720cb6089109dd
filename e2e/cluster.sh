#!/usr/bin/env bash
# A throw-away Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, and kwok driving fake GPU nodes.
#
#   e2e/cluster.sh up DIR     start everything, state and logs under DIR
#   e2e/cluster.sh env DIR    print `export` lines (KUBECONFIG, PATH)
#   e2e/cluster.sh down DIR   stop every process started by `up`, remove DIR
#
# E2E_AUDIT_POLICY names an audit policy file; the API server then writes
# an audit log to DIR/logs/audit.log (JSON lines).
#
# Nodes (E2E_NODES, default 8) each offer E2E_GPUS_PER_NODE (default 8)
# `nvidia.com/gpu`, and are spread over 2 zones (topology.kubernetes.io/zone)
# and 4 racks (pipewright.dev/rack). Binaries come from e2e/build.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    echo "usage: e2e/cluster.sh up|env|down DIR" >&2
    exit 2
}
[[ $# -eq 2 ]] || usage
action=$1
dir=$2

say() { printf '[e2e/cluster] %s\n' "$*" >&2; }
die() {
    printf 'e2e/cluster.sh: %s\n' "$*" >&2
    exit 1
}

# Ports the kernel hands out for port 0 are free at this instant; the
# processes bind them a moment later.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Polls `$@` until it succeeds, for at most $1 seconds.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            die "$what did not come up within ${seconds}s (logs in $dir/logs)"
        fi
        sleep 0.2
    done
}

# Starts a process in the background with its output in logs/NAME.log and
# records its pid so that `down` can stop it.
start() {
    local name=$1
    shift
    "$@" </dev/null >"$dir/logs/$name.log" 2>&1 &
    echo "$! $name" >>"$dir/pids"
}

certs() {
    local pki=$dir/pki
    mkdir -p "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=pipewright-e2e-ca" \
        -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
    # name, subject, extensions
    cert() {
        local name=$1 subject=$2 ext=$3
        openssl req -newkey rsa:2048 -nodes -subj "$subject" \
            -keyout "$pki/$name.key" -out "$pki/$name.csr" 2>/dev/null
        printf '%s\n' "$ext" >"$pki/$name.ext"
        openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
            -CAcreateserial -days 2 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
    }
    local client="extendedKeyUsage=clientAuth"
    cert apiserver "/CN=kube-apiserver" "$(printf '%s\n' \
        'extendedKeyUsage=serverAuth' \
        'subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local')"
    cert admin "/O=system:masters/CN=pipewright-e2e-admin" "$client"
    cert controller-manager "/CN=system:kube-controller-manager" "$client"
    cert scheduler "/CN=system:kube-scheduler" "$client"
    # Service-account tokens are signed with this key pair.
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

kubeconfig() {
    local name=$1 user=$2
    cat >"$dir/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $dir/pki/ca.crt
users:
- name: $user
  user:
    client-certificate: $dir/pki/$user.crt
    client-key: $dir/pki/$user.key
contexts:
- name: e2e
  context: {cluster: e2e, user: $user}
current-context: e2e
EOF
}

nodes() {
    local count=${E2E_NODES:-8} gpus=${E2E_GPUS_PER_NODE:-8} i
    for ((i = 0; i < count; i++)); do
        cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: gpu-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: gpu-node-$i
    topology.kubernetes.io/zone: zone-$((i % 2))
    pipewright.dev/rack: rack-$((i % 4))
    nvidia.com/gpu.present: "true"
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "110", nvidia.com/gpu: "$gpus"}
  capacity: {cpu: "32", memory: 256Gi, pods: "110", nvidia.com/gpu: "$gpus"}
  nodeInfo:
    architecture: amd64
    kubeletVersion: fake
    operatingSystem: linux
EOF
    done
}

up() {
    # A start that fails part-way stops what it started.
    trap 'down_on_error $?' EXIT
    local bin
    bin=$("$here/build.sh" | tail -1)
    [[ -e $dir/pids ]] && die "$dir already holds a cluster; run 'down' first"
    mkdir -p "$dir/logs" && mkdir -m 700 "$dir/etcd"
    : >"$dir/pids"
    local started=$SECONDS
    local etcd_port peer_port
    read -r etcd_port peer_port api_port <<<"$(free_ports 3)"
    certs
    kubeconfig admin admin
    kubeconfig controller-manager controller-manager
    kubeconfig scheduler scheduler
    local pki=$dir/pki

    start etcd "$bin/etcd" --name e2e --data-dir "$dir/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" \
        --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-cluster "e2e=http://127.0.0.1:$peer_port" \
        --unsafe-no-fsync --quota-backend-bytes 1073741824 --log-level warn
    wait_for 30 etcd curl -sf "http://127.0.0.1:$etcd_port/health"

    local audit=()
    if [[ -n ${E2E_AUDIT_POLICY:-} ]]; then
        [[ -f $E2E_AUDIT_POLICY ]] || die "E2E_AUDIT_POLICY=$E2E_AUDIT_POLICY is not a file"
        audit=(--audit-policy-file "$E2E_AUDIT_POLICY" --audit-log-path "$dir/logs/audit.log"
            --audit-log-format json --audit-log-maxsize 0)
    fi
    start kube-apiserver "$bin/kube-apiserver" "${audit[@]}" \
        --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
        --cert-dir "$dir/apiserver" \
        --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
        --client-ca-file "$pki/ca.crt" \
        --authorization-mode Node,RBAC \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$pki/sa.pub" \
        --service-account-signing-key-file "$pki/sa.key" \
        --service-cluster-ip-range 10.96.0.0/16 \
        --endpoint-reconciler-type none \
        --enable-priority-and-fairness=false \
        --profiling=false --v 1
    wait_for 60 kube-apiserver "$bin/kubectl" --kubeconfig "$dir/admin.kubeconfig" \
        get --raw /readyz

    start kube-controller-manager "$bin/kube-controller-manager" \
        --kubeconfig "$dir/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$dir/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$dir/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port 0 \
        --leader-elect=false \
        --use-service-account-credentials \
        --service-account-private-key-file "$pki/sa.key" \
        --root-ca-file "$pki/ca.crt" \
        --cluster-name e2e --profiling=false --v 1
    start kube-scheduler "$bin/kube-scheduler" \
        --kubeconfig "$dir/scheduler.kubeconfig" \
        --authentication-kubeconfig "$dir/scheduler.kubeconfig" \
        --authorization-kubeconfig "$dir/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port 0 \
        --leader-elect=false --profiling=false --v 1
    # kwok plays the kubelet of every node annotated kwok.x-k8s.io/node=fake:
    # heartbeats, and pods scheduled there go to Running and Ready.
    start kwok "$bin/kwok" \
        --kubeconfig "$dir/admin.kubeconfig" --config "$here/kwok-stages.yaml" \
        --manage-all-nodes=false \
        --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
        --node-ip 127.0.0.1 --node-lease-duration-seconds 40 \
        --cidr 10.244.0.0/16

    local k=("$bin/kubectl" --kubeconfig "$dir/admin.kubeconfig")
    nodes | "${k[@]}" apply -f - >/dev/null
    # The default service account of a namespace is made by the
    # controller-manager; pods cannot be created before it exists.
    wait_for 60 "default service account" "${k[@]}" get serviceaccount default -n default
    wait_for 60 "ready nodes" ready_nodes "${k[@]}"
    cat >"$dir/env" <<EOF
export KUBECONFIG=$dir/admin.kubeconfig
export PATH=$bin:\$PATH
export E2E_API_SERVER=https://127.0.0.1:$api_port
export E2E_CA=$dir/pki/ca.crt
EOF
    say "control plane and ${E2E_NODES:-8} nodes ready in $((SECONDS - started)) s (state in $dir)"
    trap - EXIT
}

down_on_error() {
    if [[ $1 -ne 0 && -f $dir/pids ]]; then
        say "start failed; stopping what was started (logs kept in $dir/logs)"
        E2E_KEEP=1 down
    fi
}

ready_nodes() {
    local want=${E2E_NODES:-8} got
    got=$("$@" get nodes -l type=kwok \
        -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
        grep -c '^True$' || true)
    [[ $got -eq $want ]]
}

down() {
    [[ -d $dir ]] || return 0
    if [[ -f $dir/pids ]]; then
        local pid name
        # Last started, first stopped: clients before the API server, etcd last.
        while read -r pid name; do
            kill "$pid" 2>/dev/null || true
        done < <(tac "$dir/pids")
        local deadline=$((SECONDS + 10))
        while read -r pid name; do
            while kill -0 "$pid" 2>/dev/null; do
                if ((SECONDS >= deadline)); then
                    say "$name ($pid) did not stop; killing it"
                    kill -9 "$pid" 2>/dev/null || true
                    break
                fi
                sleep 0.1
            done
        done < <(tac "$dir/pids")
        rm -f "$dir/pids"
    fi
    if [[ ${E2E_KEEP:-0} == 1 ]]; then
        say "kept $dir (E2E_KEEP=1)"
    else
        rm -rf "$dir"
    fi
}

case $action in
up) up ;;
env) cat "$dir/env" ;;
down) down ;;
*) usage ;;
esac
