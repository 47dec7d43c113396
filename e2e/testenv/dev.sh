#!/usr/bin/env bash
# `make dev`: a whole working system on one machine: a local control plane with the CRDs, the process
# kubelet (which runs data-plane pods as local processes), the demo shop API, the operator in the foreground,
# a Kafka broker, a PostgreSQL, and examples/shop/ applied. Ctrl-C stops everything.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# `make dev NODE=real`: on a real kubelet, from the images (dev-node.sh).
[ "${UMW_DEV_NODE:-process}" = real ] && exec bash "$HERE/dev-node.sh"
ROOT="$(cd "$HERE/../.." && pwd)"
DIR="${UMW_DEV_DIR:-$ROOT/.dev}"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
OPERATOR="${UMW_OPERATOR_BIN:-$BIN/umw-operator}"
DEMO="${UMW_DEMO_UPSTREAM:-127.0.0.1:9080}"
# shellcheck source=versions.sh
. "$HERE/versions.sh"
for binary in "$OPERATOR" "$BIN/umw-dataplane" "$BIN/umw-kubelet" "$BIN/examples/demo-upstream"; do
  [ -x "$binary" ] || { echo "missing $binary: run make build" >&2; exit 1; }
done

# The control plane lives as long as this process (which becomes the operator below).
bash "$HERE/up.sh" "$DIR" --owner-pid $$
export KUBECONFIG="$DIR/kubeconfig"
K="$UMW_TESTENV_BIN/kubectl"

# The demo shop API, which the example's Service upstream `shop-api:8080` resolves to.
"$BIN/examples/demo-upstream" "$DEMO" > "$DIR/demo-upstream.log" 2>&1 &
demo=$!
"$BIN/umw-kubelet" --dataplane "$BIN/umw-dataplane" --work-dir "$DIR/pods" \
  --env "UMW_RESOLVE=shop-api:8080=$DEMO" --env UMW_LOG_FORMAT=text > "$DIR/kubelet.log" 2>&1 &
kubelet=$!
# A Kafka broker for the example's EventRoute (Java 17 and the jars of `make testenv`).
KAFKA_PORT="${UMW_DEV_KAFKA_PORT:-19092}"
rm -f "$DIR/kafka/kafka.log"   # the topics stay; the log tells when this start is done
bash "$HERE/kafka.sh" start "$DIR/kafka" "$KAFKA_PORT" "$((KAFKA_PORT + 1))" > "$DIR/kafka.out" 2>&1 &
kafka=$!
# A Redis for the example's CachePolicy, when redis-server is installed (make testenv installs it).
REDIS_PORT="${UMW_DEV_REDIS_PORT:-16379}"
redis=""
if command -v redis-server >/dev/null; then
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no > "$DIR/redis.log" 2>&1 &
  redis=$!
fi
# A PostgreSQL for the example's commands (Debian's postgresql; make testenv installs it).
PG_PORT="${UMW_DEV_POSTGRES_PORT:-15432}"
bash "$HERE/postgres.sh" start "$DIR/postgres" "$PG_PORT" > "$DIR/postgres.out" 2>&1 &
postgres=$!
# All go when this process (the operator, after the exec below) ends, however it ends.
# (The watcher ignores Ctrl-C so that it outlives it; the broker, started in the background, ignores SIGINT
# and gets SIGTERM.)
(trap '' INT; while kill -0 $$ 2>/dev/null; do sleep 1; done; kill -INT $kubelet $demo 2>/dev/null; kill -TERM $kafka $redis $postgres 2>/dev/null) &
for _ in $(seq 1 600); do grep -q "Kafka Server started" "$DIR/kafka/kafka.log" 2>/dev/null && break; sleep 0.1; done
grep -q "Kafka Server started" "$DIR/kafka/kafka.log" 2>/dev/null || {
  echo "Kafka did not start (a broker of an earlier run still on port $KAFKA_PORT? set UMW_DEV_KAFKA_PORT):" >&2
  tail -5 "$DIR/kafka.out" "$DIR/kafka/kafka.log" >&2 2>/dev/null; exit 1; }
bash "$HERE/kafka.sh" topics "127.0.0.1:$KAFKA_PORT" --create --if-not-exists --topic shop.orders --partitions 3 >/dev/null
for _ in $(seq 1 300); do grep -q "ready" "$DIR/postgres.out" 2>/dev/null && break; sleep 0.1; done
grep -q "ready" "$DIR/postgres.out" 2>/dev/null || {
  echo "PostgreSQL did not start (an earlier one still on port $PG_PORT? set UMW_DEV_POSTGRES_PORT):" >&2
  tail -5 "$DIR/postgres.out" "$DIR/postgres/server.log" >&2 2>/dev/null; exit 1; }

"$K" apply --server-side -f "$ROOT/crds/manifests/crds.yaml" >/dev/null
# (Asked again while a CRD has no status yet: kubectl wait fails at once on those.)
for _ in $(seq 1 30); do "$K" wait --for=condition=Established crd --all --timeout=60s >/dev/null 2>&1 && break; sleep 0.5; done
"$K" apply -f "$ROOT/examples/shop/"
# The example names a Redis in a cluster; here it is the local one (before any pod starts).
if [ -n "$redis" ]; then
  "$K" patch middleware shop --type merge \
    -p "{\"spec\":{\"connections\":{\"redis\":{\"url\":{\"value\":\"redis://127.0.0.1:$REDIS_PORT\"}}}}}" >/dev/null
fi
# The example's Secret names a Kafka in a cluster; here it is the local broker (before any pod starts).
"$K" create secret generic shop-kafka --from-literal=bootstrap="127.0.0.1:$KAFKA_PORT" --dry-run=client -o yaml \
  | "$K" apply -f - >/dev/null
"$K" create secret generic shop-postgres --from-literal=url="postgres://umw:umw@127.0.0.1:$PG_PORT/umw" \
  --dry-run=client -o yaml | "$K" apply -f - >/dev/null

cat <<MSG

  Universal Middleware is running against a local control plane. Data-plane pods run as local
  processes (logs in $DIR/pods/), in front of the demo shop API on $DEMO, with a Kafka broker
  on 127.0.0.1:$KAFKA_PORT for the example's EventRoute and commands, and PostgreSQL on
  127.0.0.1:$PG_PORT (user umw, password umw) for the commands.
  In another shell:

    export KUBECONFIG=$DIR/kubeconfig PATH=$UMW_TESTENV_BIN:\$PATH
    kubectl wait --for=condition=Ready middleware/shop --timeout=60s
    kubectl get umw
    kubectl get pods -o wide
    curl -i http://\$(kubectl get pod -l app.kubernetes.io/instance=shop -o jsonpath='{.items[0].status.podIP}'):8080/products
    curl -i -X POST -H 'content-type: application/json' -d '{"orderId": "o-1"}' \
      http://\$(kubectl get pod -l app.kubernetes.io/instance=shop -o jsonpath='{.items[0].status.podIP}'):8080/events/orders
    curl -i -X POST -H 'content-type: application/json' -H 'idempotency-key: k-1' -d '{"orderId": "o-1", "sku": "kettle"}' \
      http://\$(kubectl get pod -l app.kubernetes.io/instance=shop -o jsonpath='{.items[0].status.podIP}'):8080/commands/place-order

  Edit a route with kubectl edit middleware shop: the pods reload it in place.
  Ctrl-C stops the operator, the pods and the control plane.

MSG
exec "$OPERATOR" --admin-address 127.0.0.1:9090 --lease-namespace default --health-interval 2s
