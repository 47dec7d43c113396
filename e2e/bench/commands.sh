#!/usr/bin/env bash
# Benchmark: commands through the transactional outbox, against plain inserts of the same rows, with the
# same PostgreSQL and Kafka broker in the same run.
#
#   make bench-commands                    # DURATION=15 RATE=2000 CONNECTIONS=64
#
# 1. Baseline: pgbench inserting what one command writes (a umw_commands row and a umw_outbox row, in one
#    transaction, into copies of the two tables with the same indexes), CONNECTIONS clients, prepared.
# 2. The data plane: POST /commands/place-order (JSON body, schema check, one transaction, 202) with wrk,
#    CONNECTIONS connections; the relay publishes every event to Kafka (acks=all, idempotent producer)
#    meanwhile. Accepted commands/s, and how long the relay needs to drain what was accepted.
# 3. Commit-to-Kafka latency at RATE commands/s (umw-load, open loop, 10 s): the relay's histogram
#    umw_outbox_relay_latency_seconds (time from the row's commit to the broker's acknowledgement),
#    p50/p99 interpolated within its buckets.
# PostgreSQL runs with its defaults (fsync and synchronous_commit on). Nothing is pinned to a CPU: on two
# cores the database, the broker, the data plane and the load generator share them. Needs Java 17 and
# Maven (Kafka), postgresql, wrk and python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DURATION="${DURATION:-15}"
RATE="${RATE:-2000}"
CONNECTIONS="${CONNECTIONS:-64}"
PG_CONNECTIONS="${PG_CONNECTIONS:-$CONNECTIONS}"   # the data plane's maxConnections
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
for tool in wrk python3 java pgbench psql curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install wrk python3 openjdk-17-jre-headless maven postgresql postgresql-client curl" >&2; exit 1; }
done
# shellcheck source=kafka-bench.sh
. "$ROOT/e2e/bench/kafka-bench.sh"

reserve_port BROKER; reserve_port CONTROLLER; reserve_port PG
BOOT="127.0.0.1:$BROKER"
bash "$KAFKA" start "$WORK/kafka" "$BROKER" "$CONTROLLER" > "$WORK/kafka.out" 2>&1 & PIDS+=($!)
bash "$ROOT/e2e/testenv/postgres.sh" start "$WORK/pg" "$PG" max_connections=200 shared_buffers=256MB > "$WORK/pg.out" 2>&1 & PIDS+=($!)
wait_for "$WORK/kafka/kafka.log" "Kafka Server started" 60
wait_for "$WORK/pg.out" "ready" 60
bash "$KAFKA" topics "$BOOT" --create --topic orders --partitions 3 > /dev/null
URL="postgres://umw:umw@127.0.0.1:$PG/umw"
sql() { PGPASSWORD=umw psql -h 127.0.0.1 -p "$PG" -U umw -d umw -qtAc "$1"; }

cat > "$WORK/commands.yaml" <<YAML
apiVersion: umw.dev/v1alpha1
kind: Middleware
metadata: {name: bench, namespace: bench}
spec:
  connections:
    postgres: {url: {value: '$URL'}, maxConnections: $PG_CONNECTIONS}
    kafka: {bootstrapServers: {value: '$BOOT'}, producer: {linger: 5ms}}
  commands:
    - name: place-order
      schema: {type: object, required: [orderId, sku], properties: {orderId: {type: string}, sku: {type: string}, quantity: {type: integer, minimum: 1}}}
      event: {type: com.example.order.placed, topic: orders}
YAML
reserve_port HTTP; reserve_port ADMIN
"$DP" --config "$WORK/commands.yaml" --http-address "127.0.0.1:$HTTP" --admin-address "127.0.0.1:$ADMIN" > "$WORK/dp.log" 2>&1 & PIDS+=($!)
BODY='{"orderId":"o-12345","sku":"kettle","quantity":2,"customer":"c-987","note":"leave at the door"}'
for _ in $(seq 1 300); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'content-type: application/json' -d "$BODY" "http://127.0.0.1:$HTTP/commands/place-order")" = 202 ] && break
  sleep 0.1
done
metric() { curl -s "http://127.0.0.1:$ADMIN/metrics" | awk -v m="$1" '$1 ~ "^"m {s+=$2} END {print s+0}'; }
depth() { sql "SELECT count(*) FROM umw_outbox WHERE published_at IS NULL"; }

echo "== baseline: pgbench, the same two rows per transaction, $CONNECTIONS clients, ${DURATION}s"
sql "CREATE TABLE bench_commands (LIKE umw_commands INCLUDING ALL); CREATE TABLE bench_outbox (LIKE umw_outbox INCLUDING ALL)"
cat > "$WORK/insert.sql" <<'SQL'
BEGIN;
INSERT INTO bench_commands (id, command, request_hash, state, status, response, expires_at) VALUES (gen_random_uuid(), 'place-order', '\x9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08', 'accepted', 202, '{"id": "0190a2f4-0000-7000-8000-000000000000", "command": "place-order", "state": "accepted"}', now() + interval '1 day');
INSERT INTO bench_outbox (id, command_id, topic, key, type, source, data, content_type, extensions) VALUES (gen_random_uuid(), gen_random_uuid(), 'orders', 'o-12345', 'com.example.order.placed', '/commands/place-order', convert_to('{"orderId":"o-12345","sku":"kettle","quantity":2,"customer":"c-987","note":"leave at the door"}', 'UTF8'), 'application/json', '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}');
END;
SQL
PGB=$(PGPASSWORD=umw pgbench -h 127.0.0.1 -p "$PG" -U umw -n -M prepared -c "$CONNECTIONS" -j 2 -T "$DURATION" -f "$WORK/insert.sql" umw 2>&1)
echo "$PGB" | grep -E "^tps|latency average|failed" || true
BASE_TPS=$(echo "$PGB" | awk '/^tps/ {print $3}' | head -1)
sql "DROP TABLE bench_commands, bench_outbox"
sql "CHECKPOINT"

echo "== the data plane: POST /commands/place-order, wrk ${DURATION}s, $CONNECTIONS connections"
cat > "$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$BODY'
LUA
PUBLISHED0=$(metric umw_outbox_published_total)
START=$(date +%s.%N)
WRK=$(wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" -s "$WORK/post.lua" "http://127.0.0.1:$HTTP/commands/place-order")
WRK_END=$(date +%s.%N)
echo "$WRK" | grep -E "Requests/sec|Non-2xx|Latency|errors" || true
CMD_RPS=$(echo "$WRK" | awk '/Requests\/sec/ {print $2}')
NON2XX=$(echo "$WRK" | awk '/Non-2xx/ {print $5}')
BACKLOG=$(depth)
for _ in $(seq 1 1200); do [ "$(depth)" = 0 ] && break; sleep 0.1; done
DRAINED=$(date +%s.%N)
PUBLISHED=$(python3 -c "print(int($(metric umw_outbox_published_total) - $PUBLISHED0))")
RELAY_RPS=$(python3 -c "print(round($PUBLISHED / ($DRAINED - $START)))")
echo "backlog when wrk stopped: $BACKLOG; drained $(python3 -c "print(round($DRAINED - $WRK_END, 1))") s later; $PUBLISHED published"

echo "== commit-to-Kafka latency at $RATE commands/s (umw-load, 10 s)"
sleep 5
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep '^umw_outbox_relay_latency_seconds_bucket' > "$WORK/before.txt"
MOD=$("$LOAD" --url "http://127.0.0.1:$HTTP/commands/place-order" --rate "$RATE" --duration 10s --connections 32 --body "$BODY")
echo "HTTP (202): $MOD"
for _ in $(seq 1 300); do [ "$(depth)" = 0 ] && break; sleep 0.1; done
sleep 1
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep '^umw_outbox_relay_latency_seconds_bucket' > "$WORK/after.txt"
LAT=$(python3 - "$WORK/before.txt" "$WORK/after.txt" <<'PY'
import re, sys
def read(path):
    out = {}
    for line in open(path):
        m = re.search(r'le="([^"]+)"\} ([0-9.e+]+)', line)
        if m:
            out[float("inf") if m.group(1) == "+Inf" else float(m.group(1))] = float(m.group(2))
    return out
before, after = read(sys.argv[1]), read(sys.argv[2])
bounds = sorted(after)
counts = [after[b] - before.get(b, 0) for b in bounds]
total = counts[-1]
def quantile(q):
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= rank:
            inside = cumulative - below
            return (lower + (bound - lower) * ((rank - below) / inside if inside else 1)) * 1000
        lower, below = bound, cumulative
print(f"{quantile(0.5):.1f} {quantile(0.99):.1f} {int(total)}")
PY
)
read -r P50 P99 SAMPLES <<< "$LAT"
echo "commit → acknowledged by Kafka: p50 $P50 ms, p99 $P99 ms ($SAMPLES events)"

echo
echo "== results ($(nproc) cores, $(date -u +%Y-%m-%d))"
printf "plain inserts of the same rows (pgbench, %s clients): %s tx/s\n" "$CONNECTIONS" "$BASE_TPS"
printf "commands accepted (wrk, %s connections):           %s /s (non-2xx: %s)  ratio %.2f\n" "$CONNECTIONS" "$CMD_RPS" "${NON2XX:-0}" "$(python3 -c "print($CMD_RPS / $BASE_TPS)")"
printf "relay throughput during and after that run:         %s events/s\n" "$RELAY_RPS"
printf "commit-to-Kafka at %s/s: p50 %s ms, p99 %s ms\n" "$RATE" "$P50" "$P99"
