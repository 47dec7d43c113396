#!/usr/bin/env bash
# `make run`: the data plane alone on examples/shop/, in front of the demo shop API, on localhost.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
HTTP="${UMW_HTTP_ADDRESS:-127.0.0.1:8080}"
ADMIN="${UMW_ADMIN_ADDRESS:-127.0.0.1:9901}"
UPSTREAM="${UMW_DEMO_UPSTREAM:-127.0.0.1:9080}"

pids=()
# Whichever way the script ends (Ctrl-C, a kill of its pid, the data plane exiting), both processes stop.
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
"$BIN/examples/demo-upstream" "$UPSTREAM" &
pids+=($!)

cat <<MSG

  Universal Middleware data plane on examples/shop/, in front of the demo shop API ($UPSTREAM).
  Try, in another shell:

    curl -i http://$HTTP/products            # twice: the second is served from the cache (Cache-Status)
    curl -i -X POST http://$HTTP/orders -H 'content-type: application/json' -d '{"sku": "kettle", "quantity": 1}'
    curl -i -X POST http://$HTTP/orders -H 'content-type: application/json' -d '{"quantity": 0}'
    curl -i -X POST http://$HTTP/events/orders -H 'content-type: application/json' -d '{"orderId": "o-1"}'
                                             # an event, published to the in-process bus (Kafka in a cluster)
    curl -i -X POST http://$HTTP/commands/place-order -H 'content-type: application/json' -H 'idempotency-key: k-1' -d '{"orderId": "o-1", "sku": "kettle"}'
                                             # a command; then GET the Location it answers (in memory here,
                                             # PostgreSQL and Kafka in a cluster)
    curl -s http://$ADMIN/status
    curl -s http://$ADMIN/metrics | grep umw_

  Edit examples/shop/shop.yaml and the data plane reloads it. Ctrl-C stops both.

MSG
"$BIN/umw-dataplane" --config "$ROOT/examples/shop/" --http-address "$HTTP" --admin-address "$ADMIN" \
  --resolve "shop-api:8080=$UPSTREAM" --log-format text --in-process-backends &
pids+=($!)
wait "${pids[1]}"
