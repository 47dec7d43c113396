# Versions of every tool the test environment builds; the cache is keyed by them.
K8S_VERSION="${K8S_VERSION:-1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-3.6.16}"
HELM_VERSION="${HELM_VERSION:-3.19.0}"
UMW_TESTENV_CACHE="${UMW_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/umw-testenv}"
UMW_TESTENV_BIN="$UMW_TESTENV_CACHE/bin-k8s$K8S_VERSION-etcd$ETCD_VERSION-helm$HELM_VERSION"
