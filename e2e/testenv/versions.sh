# Versions of every tool the test environment builds; the cache is keyed by them.
K8S_VERSION="${K8S_VERSION:-1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-3.6.16}"
HELM_VERSION="${HELM_VERSION:-3.19.0}"
KAFKA_VERSION="${KAFKA_VERSION:-3.9.1}"
# sigs.k8s.io/cli-utils, for kstatus in the e2e suite.
KSTATUS_VERSION="${KSTATUS_VERSION:-0.37.2}"
# The real node's cluster DNS; 1.14.7 builds with the same client-go (v0.35.4) as Kubernetes 1.35.4.
COREDNS_VERSION="${COREDNS_VERSION:-1.14.7}"
UMW_TESTENV_CACHE="${UMW_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/umw-testenv}"
UMW_TESTENV_BIN="$UMW_TESTENV_CACHE/bin-k8s$K8S_VERSION-etcd$ETCD_VERSION-helm$HELM_VERSION"
# The real node: images built here are tagged with this (never `latest`, which would make the kubelet pull).
UMW_IMAGE_TAG="${UMW_IMAGE_TAG:-local}"
PAUSE_VERSION="${PAUSE_VERSION:-3.10}"
# The real node's network (node.sh): its bridge, the pods' subnet and the node IP (the bridge's address).
UMW_NODE_BRIDGE="${UMW_NODE_BRIDGE:-umw0}"
UMW_NODE_SUBNET="${UMW_NODE_SUBNET:-10.88.7.0/24}"
UMW_NODE_IP="${UMW_NODE_IP:-10.88.7.1}"
# The API server's Service range, a /12 as a real cluster's default (a /24 holds 253 Services: a benchmark
# of 1,000 Middlewares filled it), and the first address in it, which the `kubernetes` Service gets.
UMW_SERVICE_CIDR="${UMW_SERVICE_CIDR:-10.96.0.0/12}"
UMW_KUBERNETES_SERVICE_IP="${UMW_KUBERNETES_SERVICE_IP:-10.96.0.1}"
