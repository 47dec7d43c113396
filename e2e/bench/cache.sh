#!/usr/bin/env bash
# Benchmark: cache hits from the data plane against nginx proxy_cache, same upstream, same run.
#
#   make bench-cache                         # DURATION=15 ROUNDS=2 CONNECTIONS=64
#
# Layout as in gateway.sh: each proxy alone on CPU 1 (one nginx worker; one data-plane worker thread), the
# upstream and the load on CPU 0. Measured: requests/s and latency of cache hits with wrk for nginx
# proxy_cache, the data plane with its in-process cache, and the data plane with Redis (a private
# redis-server on CPU 0); and the thundering herd: 1000 concurrent requests for one cold key through a
# 300 ms upstream, counting the requests that reach the upstream (nginx with proxy_cache_lock on).
# Each wrk run also reports the proxy's CPU time per request (from /proc/<pid>/stat) and how busy wrk's
# core was (1.00: the load generator, not the proxy, was the limit).
# BEFORE=path/to/an/older/umw-dataplane adds that build, with the in-process cache, in the same rounds.
# Installs Debian's nginx, wrk and redis-server when they are missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DURATION="${DURATION:-15}"
ROUNDS="${ROUNDS:-2}"
CONNECTIONS="${CONNECTIONS:-64}"
BEFORE="${BEFORE:-}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null || ! command -v redis-server >/dev/null; then
  command -v apt-get >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx wrk redis-server >/dev/null
fi
for tool in nginx wrk taskset python3 redis-server; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install nginx wrk redis-server util-linux python3" >&2; exit 1; }
done
cargo build -q --release -p umw-dataplane --bin umw-dataplane --example demo-upstream
DP="$TARGET/release/umw-dataplane"

# shellcheck source=lib.sh
. "$ROOT/e2e/bench/lib.sh"

reserve_port UP; reserve_port SLOW; reserve_port NGX; reserve_port MEM; reserve_port RED; reserve_port REDIS
reserve_port A1; reserve_port A2; reserve_port OLD; reserve_port A3
BODY='{"products":[{"id":1,"name":"Kettle","price":29.0},{"id":2,"name":"Teapot","price":19.5},{"id":3,"name":"Mug","price":7.25}]}'

mkdir -p "$WORK/up/logs" "$WORK/proxy/logs" "$WORK/proxy/cache"
cat > "$WORK/up/nginx.conf" <<CONF
daemon off; user root; worker_processes 1; worker_cpu_affinity 01; pid $WORK/up/nginx.pid;
error_log $WORK/up/logs/error.log warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $WORK/up/b; proxy_temp_path $WORK/up/p; fastcgi_temp_path $WORK/up/f;
  uwsgi_temp_path $WORK/up/u; scgi_temp_path $WORK/up/s; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { default_type application/json; return 200 '$BODY'; } } }
CONF
taskset -c 0 nginx -c "$WORK/up/nginx.conf" -p "$WORK/up" & PIDS+=($!)
# A slow upstream that counts requests, for the thundering herd.
taskset -c 0 "$TARGET/release/examples/demo-upstream" "127.0.0.1:$SLOW" > /dev/null 2>&1 & PIDS+=($!)
taskset -c 0 redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no > /dev/null & PIDS+=($!)

cat > "$WORK/proxy/nginx.conf" <<CONF
daemon off; user root; worker_processes 1; worker_cpu_affinity 10; pid $WORK/proxy/nginx.pid;
error_log $WORK/proxy/logs/error.log warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $WORK/proxy/b; proxy_temp_path $WORK/proxy/p; fastcgi_temp_path $WORK/proxy/f;
  uwsgi_temp_path $WORK/proxy/u; scgi_temp_path $WORK/proxy/s; keepalive_requests 1000000;
  proxy_cache_path $WORK/proxy/cache keys_zone=c:10m max_size=100m inactive=10m;
  upstream app { server 127.0.0.1:$UP; keepalive 256; }
  upstream slow { server 127.0.0.1:$SLOW; keepalive 256; }
  server { listen 127.0.0.1:$NGX;
    proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host \$host;
    proxy_cache c; proxy_cache_valid 200 60s; proxy_cache_lock on; proxy_cache_lock_timeout 5s;
    add_header X-Cache \$upstream_cache_status;
    location /slow/ { proxy_pass http://slow; }
    location / { proxy_pass http://app; } } }
CONF
taskset -c 1 nginx -c "$WORK/proxy/nginx.conf" -p "$WORK/proxy" & NGX_MASTER=$!; PIDS+=($NGX_MASTER)

dataplane_conf() { # redis?
  local connections="" 
  [ "$1" = redis ] && connections="  connections:
    redis:
      url: {value: 'redis://127.0.0.1:$REDIS'}"
  cat <<YAML
apiVersion: umw.dev/v1alpha1
kind: Middleware
metadata: {name: bench}
spec:
  routes:
    - name: slow
      match: {pathPrefix: /slow}
      upstream: {url: 'http://127.0.0.1:$SLOW'}
    - name: all
      upstream: {url: 'http://127.0.0.1:$UP'}
  observability: {logLevel: warn}
$connections
---
apiVersion: umw.dev/v1alpha1
kind: CachePolicy
metadata: {name: bench}
spec:
  targetRefs: [{name: bench}]
  rules: [{ttl: 60s}]
YAML
}
dataplane_conf memory > "$WORK/memory.yaml"; dataplane_conf redis > "$WORK/redis.yaml"
taskset -c 1 "$DP" --config "$WORK/memory.yaml" --http-address "127.0.0.1:$MEM" --admin-address "127.0.0.1:$A1" --worker-threads 1 2>/dev/null & MEM_PID=$!; PIDS+=($MEM_PID)
taskset -c 1 "$DP" --config "$WORK/redis.yaml" --http-address "127.0.0.1:$RED" --admin-address "127.0.0.1:$A2" --worker-threads 1 2>/dev/null & RED_PID=$!; PIDS+=($RED_PID)
NAMES="nginx memory redis"; DP_PORTS="$MEM $RED"; ADMINS="$A1 $A2"
if [ -n "$BEFORE" ]; then
  taskset -c 1 "$BEFORE" --config "$WORK/memory.yaml" --http-address "127.0.0.1:$OLD" --admin-address "127.0.0.1:$A3" --worker-threads 1 2>/dev/null & OLD_PID=$!; PIDS+=($OLD_PID)
  NAMES="$NAMES before"; DP_PORTS="$DP_PORTS $OLD"; ADMINS="$ADMINS $A3"
fi
for port in $UP $NGX $DP_PORTS; do until curl -sf "http://127.0.0.1:$port/products" >/dev/null 2>&1; do sleep 0.05; done; done
for a in $ADMINS; do until curl -sf "http://127.0.0.1:$a/readyz" >/dev/null 2>&1; do sleep 0.05; done; done
# Fill the caches, then check that each proxy answers the benchmark path from its cache.
for port in $NGX $DP_PORTS; do curl -s "http://127.0.0.1:$port/products" >/dev/null; sleep 0.3; done
curl -sI "http://127.0.0.1:$NGX/products" | grep -qi 'x-cache: HIT' || { echo "nginx does not answer from its cache" >&2; exit 1; }
for port in $DP_PORTS; do
  curl -sI "http://127.0.0.1:$port/products" | grep -qi 'cache-status: umw; hit' || { echo "port $port does not answer from its cache" >&2; exit 1; }
done

wrk_run() { # port pid... → "rps p50 p99 cpu_us_per_request wrk_core_busy"
  local port=$1; shift
  taskset -c 0 wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$port/products" >/dev/null
  local before core; before=$(ticks "$@"); core=$(cpu0)
  local out; out=$(taskset -c 0 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:$port/products")
  local spent=$(( $(ticks "$@") - before ))
  echo "$out" | python3 -c '
import re, sys
text = sys.stdin.read()
spent, hz, duration = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
total, idle = map(int, sys.argv[4].split()); total2, idle2 = map(int, sys.argv[5].split())
def ms(v, unit): return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50, p99 = (ms(*re.search(r"\s" + p + r"%\s+([\d.]+)(us|ms|s)", text).groups()) for p in ("50", "99"))
busy = 1 - (idle2 - idle) / max(total2 - total, 1)
print("%.0f %.3f %.3f %.2f %.2f" % (rps, p50, p99, spent / hz * 1e6 / max(rps * duration, 1), busy))' \
    "$spent" "$HZ" "$DURATION" "$core" "$(cpu0)"
}
declare -A RPS P50 P99 CPU BUSY
for round in $(seq 1 "$ROUNDS"); do
  for name in $NAMES; do
    case $name in
      nginx) port=$NGX; pids=$(nginx_pids "$NGX_MASTER") ;;
      memory) port=$MEM; pids=$MEM_PID ;;
      redis) port=$RED; pids=$RED_PID ;;
      before) port=$OLD; pids=$OLD_PID ;;
    esac
    # shellcheck disable=SC2086
    read -r rps p50 p99 cpu busy < <(wrk_run "$port" $pids)
    echo "round $round $name: $rps req/s p50 ${p50}ms p99 ${p99}ms, ${cpu} µs CPU/request, wrk core $busy" >&2
    RPS[$name]="${RPS[$name]:-} $rps"; P50[$name]="${P50[$name]:-} $p50"; P99[$name]="${P99[$name]:-} $p99"
    CPU[$name]="${CPU[$name]:-} $cpu"; BUSY[$name]="${BUSY[$name]:-} $busy"
  done
done

# Thundering herd: 1000 concurrent requests for one cold key each, through a 300 ms upstream; the demo
# upstream's /hits says how many reached it.
herd() { # port path → upstream requests (or "errors")
  local before after
  before=$(curl -s "http://127.0.0.1:$SLOW/hits")
  python3 - "$1" "$2" <<'PY' || { echo errors; return; }
import concurrent.futures, http.client, sys
port, path = int(sys.argv[1]), sys.argv[2]
def one(_):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30); c.request("GET", path); r = c.getresponse(); r.read(); return r.status
with concurrent.futures.ThreadPoolExecutor(max_workers=250) as pool:
    statuses = list(pool.map(one, range(1000)))
sys.exit(1 if any(s != 200 for s in statuses) else 0)
PY
  after=$(curl -s "http://127.0.0.1:$SLOW/hits")
  echo $((after - before))
}
herd_nginx=$(herd "$NGX" "/slow/300?k=nginx")
herd_mem=$(herd "$MEM" "/slow/300?k=memory")
herd_red=$(herd "$RED" "/slow/300?k=redis")

mean() { python3 -c 'import sys; v=[float(x) for x in sys.argv[1:]]; print("%.3f" % (sum(v)/len(v)))' "$@"; }
python3 - "$(mean ${RPS[nginx]})" "$(mean ${RPS[memory]})" "$(mean ${RPS[redis]})" \
  "$(mean ${P50[nginx]})" "$(mean ${P50[memory]})" "$(mean ${P50[redis]})" \
  "$(mean ${P99[nginx]})" "$(mean ${P99[memory]})" "$(mean ${P99[redis]})" \
  "$herd_nginx" "$herd_mem" "$herd_red" "$ROUNDS" "$DURATION" "$CONNECTIONS" \
  "$(mean ${CPU[nginx]})" "$(mean ${CPU[memory]})" "$(mean ${CPU[redis]})" \
  "$(mean ${BUSY[nginx]})" "$(mean ${BUSY[memory]})" "$(mean ${BUSY[redis]})" \
  "$([ -n "$BEFORE" ] && echo "$(mean ${RPS[before]}) $(mean ${CPU[before]})")" <<'PY'
import sys
a = sys.argv[1:]
rn, rm, rr, pn, pm, pr, qn, qm, qr = map(float, a[:9])
hn, hm, hr = a[9:12]
rounds, duration, conns = a[12:15]
cn, cm, cr, bn, bm, br = map(float, a[15:21])
before = a[21].split()
print("| Figure | nginx proxy_cache | umw, in-process cache | umw, Redis |")
print("|---|---|---|---|")
print(f"| Cache-hit requests/s ({conns} connections, {rounds}×{duration}s, mean) | {rn:,.0f} | {rm:,.0f} (**{rm/rn:.2f}×**) | {rr:,.0f} (**{rr/rn:.2f}×**) |")
print(f"| p50 latency | {pn:.3f} ms | {pm:.3f} ms ({pm/pn:.2f}×) | {pr:.3f} ms ({pr/pn:.2f}×) |")
print(f"| p99 latency | {qn:.3f} ms | {qm:.3f} ms ({qm/qn:.2f}×) | {qr:.3f} ms ({qr/qn:.2f}×) |")
print(f"| Proxy CPU per request under wrk | {cn:.2f} µs | {cm:.2f} µs ({cm/cn:.2f}×) | {cr:.2f} µs ({cr/cn:.2f}×) |")
print(f"| Load generator's core busy under wrk | {bn:.2f} | {bm:.2f} | {br:.2f} |")
print(f"| 1000 concurrent requests for a cold key: requests that reached the upstream | {hn} | {hm} | {hr} |")
if before:
    br_rps, br_cpu = map(float, before)
    print()
    print(f"In-process cache, this build against BEFORE in the same rounds: {rm:,.0f} against {br_rps:,.0f} requests/s "
          f"({rm/br_rps:.2f}×), {cm:.2f} against {br_cpu:.2f} µs of CPU per request ({cm/br_cpu:.2f}×).")
PY
