# Pinned versions of the control plane and tools the end-to-end tests use.
# Kubernetes matches the operator's k8s-openapi feature (v1_34).
# shellcheck shell=bash
export KUBERNETES_VERSION=v1.34.4
export ETCD_VERSION=v3.6.16
export KWOK_VERSION=v0.8.0
export HELM_VERSION=v3.22.0
