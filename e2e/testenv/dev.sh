#!/usr/bin/env bash
# `make dev`: a local control plane with the CRDs, the operator in the foreground, and the examples
# applied. Ctrl-C stops the operator and the control plane.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DIR="${UMW_DEV_DIR:-$ROOT/.dev}"
OPERATOR="${UMW_OPERATOR_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/umw-operator}"

bash "$HERE/build-tools.sh"
# shellcheck source=versions.sh
. "$HERE/versions.sh"
[ -x "$OPERATOR" ] || { echo "missing $OPERATOR: run cargo build -p umw-operator" >&2; exit 1; }

# The control plane lives as long as this process (which becomes the operator below).
bash "$HERE/up.sh" "$DIR" --owner-pid $$
export KUBECONFIG="$DIR/kubeconfig"
K="$UMW_TESTENV_BIN/kubectl"
"$K" apply --server-side -f "$ROOT/crds/manifests/crds.yaml" >/dev/null
"$K" wait --for=condition=Established crd --all --timeout=60s >/dev/null
"$K" apply -f "$ROOT/examples/"

cat <<MSG

  Universal Middleware is running against a local control plane.
  In another shell:

    export KUBECONFIG=$DIR/kubeconfig PATH=$UMW_TESTENV_BIN:\$PATH
    kubectl get umw
    kubectl describe middleware shop

  There is no kubelet here, so data-plane pods stay Pending; everything else is real.
  Ctrl-C stops the operator and the control plane.

MSG
exec "$OPERATOR" --admin-address 127.0.0.1:8080 --lease-namespace default
