# Pinned versions of the control plane and tools the end-to-end tests use.
# Kubernetes matches the operator's k8s-openapi feature (v1_34).
# shellcheck shell=bash disable=SC2034
KUBERNETES_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
