#!/usr/bin/env bash
# `make dev NODE=real`: the whole system as a cluster runs it, on this machine: a local control plane
# with a real node (kubelet, containerd, runc, kube-proxy, CoreDNS: node.sh), the chart installed with
# the images built from the Dockerfiles (make images), Kafka, Redis, PostgreSQL and the demo shop API
# on the node's address behind Services named as examples/shop/ expects, and examples/shop/ applied as
# it is. Ctrl-C stops everything and restores the host before it returns. Needs root.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DIR="${UMW_DEV_DIR:-$ROOT/.dev}/node"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
# shellcheck source=versions.sh
. "$HERE/versions.sh"
[ -x "$BIN/examples/demo-upstream" ] || { echo "missing $BIN/examples/demo-upstream: run make build" >&2; exit 1; }
IP=$UMW_NODE_IP
K=("$UMW_TESTENV_BIN/kubectl" --kubeconfig "$DIR/kubeconfig")
mkdir -p "$DIR"

# The control plane and the node live as long as this script.
bash "$HERE/up.sh" "$DIR" --owner-pid $$ --node

# The backends, on the node's address (pods reach it; nothing else does), on their usual ports. On the
# way out they stop, and so do the node and the control plane (the host restored) before this returns.
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null; bash "$HERE/up.sh" --down "$DIR"' EXIT
trap 'exit 130' INT TERM
"$BIN/examples/demo-upstream" "$IP:8080" > "$DIR/demo-upstream.log" 2>&1 &
pids+=($!)
redis-server --bind "$IP" --port 6379 --protected-mode no --save "" --appendonly no > "$DIR/redis.log" 2>&1 &
pids+=($!)
rm -f "$DIR/kafka/kafka.log"
KAFKA_HOST=$IP bash "$HERE/kafka.sh" start "$DIR/kafka" 9092 19093 > "$DIR/kafka.out" 2>&1 &
pids+=($!)
PG_HOST=$IP PG_CLIENTS=$UMW_NODE_SUBNET bash "$HERE/postgres.sh" start "$DIR/postgres" 5432 > "$DIR/postgres.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do grep -q "Kafka Server started" "$DIR/kafka/kafka.log" 2>/dev/null && break; sleep 0.1; done
grep -q "Kafka Server started" "$DIR/kafka/kafka.log" 2>/dev/null ||
  { echo "Kafka did not start:" >&2; tail -5 "$DIR/kafka.out" >&2; exit 1; }
bash "$HERE/kafka.sh" topics "$IP:9092" --create --if-not-exists --topic shop.orders --partitions 3 >/dev/null
for _ in $(seq 1 300); do grep -q "^\[postgres\] ready" "$DIR/postgres.out" 2>/dev/null && break; sleep 0.1; done
grep -q "^\[postgres\] ready" "$DIR/postgres.out" ||
  { echo "PostgreSQL did not start:" >&2; tail -5 "$DIR/postgres.out" >&2; exit 1; }
# The example's credentials (examples/shop/shop.yaml, Secret shop-postgres), once.
sql() { PGPASSWORD=umw psql -h "$IP" -p 5432 -U umw -d umw -tAq -v ON_ERROR_STOP=1 -c "$1"; }
[ -n "$(sql "SELECT 1 FROM pg_roles WHERE rolname = 'shop'")" ] || sql "CREATE ROLE shop LOGIN PASSWORD 'change-me'" >/dev/null
[ -n "$(sql "SELECT 1 FROM pg_database WHERE datname = 'shop'")" ] || sql "CREATE DATABASE shop OWNER shop" >/dev/null

# Services without selectors, as for any backend outside the cluster: the example's names resolve
# (CoreDNS) and route (kube-proxy) to the servers above.
service() {
  local namespace=$1 name=$2 port=$3
  "${K[@]}" apply -n "$namespace" -f - >/dev/null <<YAML
apiVersion: v1
kind: Service
metadata: {name: $name}
spec: {ports: [{name: main, port: $port, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: $name, labels: {kubernetes.io/service-name: $name}}
addressType: IPv4
ports: [{name: main, port: $port, protocol: TCP}]
endpoints: [{addresses: ['$IP']}]
YAML
}
"${K[@]}" create namespace shop >/dev/null
service shop redis 6379
service shop kafka 9092
service shop postgres 5432
service default shop-api 8080

# The chart, as a user installs it, with the images built here.
op=$(bash "$HERE/images.sh" --print-names | grep umw-operator)
dp=$(bash "$HERE/images.sh" --print-names | grep umw-dataplane)
"$UMW_TESTENV_BIN/helm" --kubeconfig "$DIR/kubeconfig" install umw "$ROOT/charts/umw" \
  --namespace umw-system --create-namespace \
  --set "image.repository=${op%:*},image.tag=${op##*:}" \
  --set "dataplane.image.repository=${dp%:*},dataplane.image.tag=${dp##*:}" --wait --timeout 3m >/dev/null
"${K[@]}" apply -f "$ROOT/examples/shop/"

cat <<MSG

  Universal Middleware on a real node: the operator (installed by the chart) and the data-plane pods run
  in containers from the images built here, on a kubelet with containerd and runc. Kafka, Redis,
  PostgreSQL and the demo shop API listen on the node's address $IP, behind the Services the example
  names. In another shell (as root):

    export KUBECONFIG=$DIR/kubeconfig PATH=$UMW_TESTENV_BIN:\$PATH
    kubectl wait --for=condition=Ready middleware/shop --timeout=120s
    kubectl get umw
    kubectl get pods -A -o wide
    curl -i http://\$(kubectl get pod -l app.kubernetes.io/instance=shop -o jsonpath='{.items[0].status.podIP}'):8080/products
    curl -i http://\$(kubectl get service umw-shop -o jsonpath='{.spec.clusterIP}'):8080/products     # through kube-proxy
    curl -i -X POST -H 'content-type: application/json' -H 'idempotency-key: k-1' -d '{"orderId": "o-1", "sku": "kettle"}' \\
      http://\$(kubectl get service umw-shop -o jsonpath='{.spec.clusterIP}'):8080/commands/place-order
    kubectl logs -n umw-system deployment/umw-operator

  Edit a route with kubectl edit middleware shop: the kubelet updates the pods' ConfigMap volume and they
  reload it in place (within about 10 s). Ctrl-C stops everything and restores the host.

MSG
wait "${pids[0]}"
