#!/usr/bin/env bash
# Benchmark: events into and out of a real Apache Kafka broker (KRaft, one node), same broker, same run.
#
#   make bench-events                      # DURATION=15 RATE=2000 RECORDS=300000 CONSUME=100000
#
# 1. Kafka's own producer perf tool (ProducerPerformance, acks=all, linger 5 ms, 200-byte records, 3
#    partitions): records/s at full speed, and latency percentiles at RATE records/s.
# 2. HTTP ingest through the data plane (POST /events/bench → the same kind of topic, acks=all, linger 5 ms,
#    a 200-byte JSON body): requests/s with wrk (every 202 means the broker acknowledged the event), the
#    same with batches of 100 events per request (application/cloudevents-batch+json), and acknowledgement
#    latency at RATE requests/s with umw-load (open loop, no coordinated omission).
# 3. Consumer → webhook: CONSUME records already in a topic, delivered by one data plane to an nginx webhook
#    answering 204; events/s from first to last delivery.
# Ingest reports the data plane's CPU time per event (its threads and librdkafka's, from /proc/<pid>/stat).
# BEFORE=path/to/an/older/umw-dataplane runs the two ingest runs against that build too, on the same broker
# right after each of this build's (DATAPLANE=path measures a given build as this one). LINGER_MS (5) and
# COMPRESSION (none, gzip, snappy, lz4) set both producers alike.
# The data plane runs on CPU 1; the broker, the load generators and the webhook share CPU 0 and 1 as the
# kernel schedules them (a 2-core machine cannot isolate a JVM broker). Needs Java 17 and Maven (Kafka is
# fetched by e2e/testenv/kafka.sh), nginx and wrk.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DURATION="${DURATION:-15}"
RATE="${RATE:-2000}"
RECORDS="${RECORDS:-300000}"
CONSUME="${CONSUME:-100000}"
BEFORE="${BEFORE:-}"
LINGER_MS="${LINGER_MS:-5}"
COMPRESSION="${COMPRESSION:-none}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
for tool in nginx wrk taskset python3 java; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install nginx wrk util-linux python3 openjdk-17-jre-headless maven" >&2; exit 1; }
done
# shellcheck source=kafka-bench.sh
. "$ROOT/e2e/bench/kafka-bench.sh"
wait_http() { # URL
  for _ in $(seq 1 300); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "timed out waiting for $1" >&2; exit 1
}

reserve_port BROKER; reserve_port CONTROLLER; reserve_port HOOK
BOOT="127.0.0.1:$BROKER"
bash "$KAFKA" start "$WORK/kafka" "$BROKER" "$CONTROLLER" > "$WORK/kafka.out" 2>&1 & PIDS+=($!)
wait_for "$WORK/kafka/kafka.log" "Kafka Server started" 60
for topic in perf ingest consume; do
  bash "$KAFKA" topics "$BOOT" --create --topic "$topic" --partitions 3 > /dev/null
done
PAYLOAD=$(python3 -c 'print("{\"orderId\":\"o-12345\",\"customer\":\"c-987\",\"status\":\"paid\",\"note\":\"" + "x"*128 + "\"}")')
echo "payload: ${#PAYLOAD} bytes"

echo "== Kafka ProducerPerformance, full speed ($RECORDS records)"
PERF=$(bash "$KAFKA" perf-producer "$BOOT" --topic perf --num-records "$RECORDS" --record-size ${#PAYLOAD} \
  --throughput -1 --producer-props acks=all linger.ms=$LINGER_MS compression.type=$COMPRESSION enable.idempotence=true | tail -1)
echo "$PERF"
PERF_RPS=$(echo "$PERF" | sed -E 's/.* records sent, ([0-9.]+) records\/sec.*/\1/')

cat > "$WORK/ingest.yaml" <<YAML
apiVersion: umw.dev/v1alpha1
kind: Middleware
metadata: {name: bench, namespace: bench}
spec:
  connections:
    kafka:
      bootstrapServers: {value: '$BOOT'}
      producer: {linger: ${LINGER_MS}ms, compression: $COMPRESSION, maxInFlight: 100000}
---
apiVersion: umw.dev/v1alpha1
kind: EventRoute
metadata: {name: ingest, namespace: bench}
spec:
  targetRefs: [{name: bench}]
  source: {http: {path: /events/bench}}
  destination: {kafka: {topic: ingest}}
YAML
BATCH=$(python3 -c '
import json
data = {"orderId": "o-12345", "customer": "c-987", "status": "paid", "note": "x" * 128}
print(json.dumps([{"specversion": "1.0", "id": "b-%d" % i, "type": "order.placed", "source": "/bench", "data": data} for i in range(100)], separators=(",", ":")))')
cat > "$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$PAYLOAD'
LUA
cat > "$WORK/batch.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/cloudevents-batch+json"
wrk.body = '$BATCH'
LUA
start_ingest() { # BINARY NAME: starts it on CPU 1, sets PORT_<NAME> and PID_<NAME>
  reserve_port "PORT_$2"; reserve_port "ADMIN_$2"
  local port="PORT_$2" admin="ADMIN_$2"
  taskset -c 1 "$1" --config "$WORK/ingest.yaml" --http-address "127.0.0.1:${!port}" --admin-address "127.0.0.1:${!admin}" \
    > "$WORK/ingest-$2.log" 2>&1 & PIDS+=($!)
  printf -v "PID_$2" %s "$!"
  wait_http "http://127.0.0.1:${!admin}/readyz"
  for _ in $(seq 1 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'content-type: application/json' -d "$PAYLOAD" "http://127.0.0.1:${!port}/events/bench")" = 202 ] && break
    sleep 0.1
  done
}
ingest_run() { # NAME SCRIPT CONNECTIONS EVENTS_PER_REQUEST: prints "events/s non-2xx µs-CPU-per-event" (and, on stderr, a line saying so)
  local port="PORT_$1" pid="PID_$1" before after out
  before=$(ticks "${!pid}")
  out=$(taskset -c 0 wrk -t2 -c"$3" -d"${DURATION}s" -s "$WORK/$2" "http://127.0.0.1:${!port}/events/bench")
  after=$(ticks "${!pid}")
  echo "$out" | grep -E "Requests/sec|Non-2xx|Latency|errors" >&2 || true
  local result events non2xx cpu
  result=$(python3 - "$(echo "$out" | awk '/Requests\/sec/ {print $2}')" "$(echo "$out" | awk '/Non-2xx/ {print $5}')" "$4" "$((after - before))" "$HZ" "$DURATION" <<'PY'
import sys
rps, non2xx, per, ticks, hz, duration = float(sys.argv[1]), sys.argv[2] or "0", int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
events = rps * per
print("%.0f %s %.1f" % (events, non2xx, ticks / hz / (events * duration) * 1e6))
PY
)
  read -r events non2xx cpu <<<"$result"
  echo "$1: $events events/s, $cpu µs CPU/event (non-2xx ${non2xx:-0})" >&2
  echo "$result"
}
start_ingest "$DP" umw
IN=$PORT_umw
[ -z "$BEFORE" ] || start_ingest "$BEFORE" before
echo "== HTTP ingest through the data plane, wrk ${DURATION}s, 256 connections"
read -r INGEST_RPS NON2XX INGEST_CPU < <(ingest_run umw post.lua 256 1)
[ -z "$BEFORE" ] || read -r B_INGEST B_NON2XX B_INGEST_CPU < <(ingest_run before post.lua 256 1)
echo "== HTTP ingest, batches of 100 events, wrk ${DURATION}s, 64 connections"
read -r BATCH_EPS NON2XXB BATCH_CPU < <(ingest_run umw batch.lua 64 100)
[ -z "$BEFORE" ] || read -r B_BATCH B_NON2XXB B_BATCH_CPU < <(ingest_run before batch.lua 64 100)
[ -z "$BEFORE" ] || kill "$PID_before" 2>/dev/null || true
# Latency at a moderate rate, each after a pause so that the broker has caught up with the runs above.
sleep 10
echo "== Kafka ProducerPerformance at $RATE records/s"
PERF_MOD=$(bash "$KAFKA" perf-producer "$BOOT" --topic perf --num-records $((RATE * 10)) --record-size ${#PAYLOAD} \
  --throughput "$RATE" --producer-props acks=all linger.ms=$LINGER_MS compression.type=$COMPRESSION enable.idempotence=true | tail -1)
echo "$PERF_MOD"
PERF_P99=$(echo "$PERF_MOD" | sed -E 's/.* ([0-9]+) ms 99th.*/\1/')
sleep 5
echo "== HTTP ingest at $RATE requests/s (umw-load, 10 s)"
MOD=$(taskset -c 0 "$LOAD" --url "http://127.0.0.1:$IN/events/bench" --rate "$RATE" --duration 10s --connections 64 --body "$PAYLOAD")
echo "$MOD"
INGEST_P99=$(echo "$MOD" | python3 -c 'import json,sys; print(json.load(sys.stdin)["p99_us"] / 1000)')

echo "== consumer → webhook: $CONSUME records"
mkdir -p "$WORK/hook/logs"
cat > "$WORK/hook/nginx.conf" <<CONF
daemon off; user root; worker_processes 1; pid $WORK/hook/nginx.pid; error_log $WORK/hook/logs/error.log warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $WORK/hook/b; proxy_temp_path $WORK/hook/p; fastcgi_temp_path $WORK/hook/f;
  uwsgi_temp_path $WORK/hook/u; scgi_temp_path $WORK/hook/s; keepalive_requests 1000000;
  server { listen 127.0.0.1:$HOOK; location / { return 204; } } }
CONF
nginx -c "$WORK/hook/nginx.conf" -p "$WORK/hook" & PIDS+=($!)
bash "$KAFKA" perf-producer "$BOOT" --topic consume --num-records "$CONSUME" --record-size ${#PAYLOAD} \
  --throughput -1 --producer-props acks=all linger.ms=5 > /dev/null
cat > "$WORK/consume.yaml" <<YAML
apiVersion: umw.dev/v1alpha1
kind: Middleware
metadata: {name: bench, namespace: bench}
spec:
  connections:
    kafka: {bootstrapServers: {value: '$BOOT'}}
---
apiVersion: umw.dev/v1alpha1
kind: EventRoute
metadata: {name: consume, namespace: bench}
spec:
  targetRefs: [{name: bench}]
  source: {kafka: {topic: consume, group: bench}}
  destination: {http: {url: 'http://127.0.0.1:$HOOK/hook'}}
YAML
reserve_port OUT; reserve_port OUT_ADMIN
START=$(date +%s.%N)
taskset -c 1 "$DP" --config "$WORK/consume.yaml" --http-address "127.0.0.1:$OUT" --admin-address "127.0.0.1:$OUT_ADMIN" \
  > "$WORK/consume.log" 2>&1 & PIDS+=($!)
delivered() { curl -s "http://127.0.0.1:$OUT_ADMIN/metrics" | awk '/^umw_events_handled_total/ && /outcome="delivered"/ {s+=$2} END {print s+0}'; }
FIRST=""
for _ in $(seq 1 3000); do
  n=$(delivered 2>/dev/null || true); n=${n:-0}
  if [ -z "$FIRST" ] && [ "${n%.*}" -gt 0 ]; then FIRST=$(date +%s.%N); FIRST_N=${n%.*}; fi
  [ "${n%.*}" -ge "$CONSUME" ] && break
  sleep 0.1
done
END=$(date +%s.%N)
CONSUME_RPS=$(python3 -c "print(round(($CONSUME - $FIRST_N) / ($END - $FIRST)))")
echo "delivered $(delivered) in $(python3 -c "print(round($END - $FIRST, 1))") s after the first (joined the group $(python3 -c "print(round($FIRST - $START, 1))") s after the start)"

echo
echo "== results ($(nproc) cores, $(date -u +%Y-%m-%d))"
printf "Kafka ProducerPerformance, full speed:  %s records/s\n" "$PERF_RPS"
printf "HTTP ingest (wrk, 256 connections):     %s events/s (non-2xx: %s)  ratio %.2f\n" "$INGEST_RPS" "${NON2XX:-0}" "$(python3 -c "print($INGEST_RPS / $PERF_RPS)")"
printf "HTTP ingest, batches of 100 (wrk, 64):  %s events/s (non-2xx: %s)  ratio %.2f\n" "$BATCH_EPS" "${NON2XXB:-0}" "$(python3 -c "print($BATCH_EPS / $PERF_RPS)")"
echo "data plane CPU per event: one per request $INGEST_CPU µs, in batches $BATCH_CPU µs (linger ${LINGER_MS} ms, compression $COMPRESSION)"
if [ -n "$BEFORE" ]; then
  printf "BEFORE: one per request %s events/s (%s µs CPU/event), batches %s events/s (%s µs CPU/event); now/before %.2f× and %.2f×\n" \
    "$B_INGEST" "$B_INGEST_CPU" "$B_BATCH" "$B_BATCH_CPU" "$(python3 -c "print($INGEST_RPS / $B_INGEST)")" "$(python3 -c "print($BATCH_EPS / $B_BATCH)")"
fi
printf "p99 at %s/s: ProducerPerformance %s ms, HTTP ingest (202 = acknowledged) %s ms\n" "$RATE" "$PERF_P99" "$INGEST_P99"
printf "consumer → webhook: %s events/s\n" "$CONSUME_RPS"
