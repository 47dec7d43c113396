#!/usr/bin/env bash
# Benchmark: HTTPS termination to a plain upstream, the data plane against nginx with `ssl`, same
# certificate (ECDSA P-256), same upstream, same run.
#
#   make bench-tls                          # DURATION=10 ROUNDS=2 CONNECTIONS=64
#
# Layout as in gateway.sh: the proxy under test alone on CPU 1 (one nginx worker; one data-plane worker
# thread), the upstream (nginx answering a fixed body) and wrk on CPU 0. Both proxies offer TLS 1.3 and
# 1.2 with session resumption on (nginx: a shared session cache and tickets; the data plane: tickets and
# a session cache). Two loads, each in alternating order, ROUNDS rounds:
#   - keep-alive: requests/s and latency over CONNECTIONS TLS connections (bulk encryption and HTTP);
#   - new connections: `Connection: close` on every request, so each request is a new TCP connection and
#     a TLS 1.3 handshake; wrk offers the session it was given last, so most of them are resumptions
#     (PSK with a fresh X25519 exchange), as with browsers that come back: handshakes/s. The data plane's
#     umw_tls_handshakes_total printed at the end says how many were full and how many resumed.
# For each, the proxy's CPU time per request (from /proc/<pid>/stat) and how busy wrk's core was (1.00:
# the load generator, not the proxy, was the limit). Installs Debian's nginx and wrk when missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-2}"
CONNECTIONS="${CONNECTIONS:-64}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  command -v apt-get >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx wrk >/dev/null
fi
for tool in nginx wrk taskset python3 openssl curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install nginx wrk util-linux python3 openssl curl" >&2; exit 1; }
done
NGINX="$(command -v nginx)"

cargo build -q --release -p umw-dataplane --bin umw-dataplane
DP="$TARGET/release/umw-dataplane"

# shellcheck source=lib.sh
. "$ROOT/e2e/bench/lib.sh"

reserve_port UP; reserve_port NGX; reserve_port UMW; reserve_port ADMIN
BODY='{"products":[{"id":1,"name":"Kettle","price":29.0},{"id":2,"name":"Teapot","price":19.5},{"id":3,"name":"Mug","price":7.25}]}'

# One certificate for both, for 127.0.0.1 and localhost, signed by a throwaway authority.
(
  cd "$WORK"
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.crt -days 2 -subj /CN=bench-ca 2>/dev/null
  openssl req "${ec[@]}" -keyout tls.key -out tls.csr -subj /CN=localhost 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > tls.ext
  openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out tls.crt -days 2 -extfile tls.ext 2>/dev/null
)

nginx_conf() { # name cpu body
  local dir="$WORK/$1"; mkdir -p "$dir/logs"
  cat > "$dir/nginx.conf" <<CONF
daemon off;
user root;
worker_processes 1;
worker_cpu_affinity $2;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/body; proxy_temp_path $dir/proxy; fastcgi_temp_path $dir/fcgi;
  uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
  keepalive_requests 1000000;
  $3
}
CONF
  echo "$dir/nginx.conf"
}

conf=$(nginx_conf upstream 01 "server { listen 127.0.0.1:$UP; location / { default_type application/json; return 200 '$BODY'; } }")
taskset -c 0 "$NGINX" -c "$conf" -p "$WORK/upstream" & PIDS+=($!)

conf=$(nginx_conf proxy 10 "upstream app { server 127.0.0.1:$UP; keepalive 256; }
  server { listen 127.0.0.1:$NGX ssl http2;
    ssl_certificate $WORK/tls.crt; ssl_certificate_key $WORK/tls.key;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m; ssl_session_tickets on;
    location / { proxy_pass http://app; proxy_http_version 1.1;
    proxy_set_header Connection \"\"; proxy_set_header Host \$host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto \$scheme; } }")
taskset -c 1 "$NGINX" -c "$conf" -p "$WORK/proxy" & NGX_MASTER=$!; PIDS+=($NGX_MASTER)

cat > "$WORK/umw.yaml" <<YAML
apiVersion: umw.dev/v1alpha1
kind: Middleware
metadata: {name: bench}
spec:
  listeners:
    http:
      tls:
        certificates: [{certFile: '$WORK/tls.crt', keyFile: '$WORK/tls.key'}]
  routes:
    - name: all
      upstream: {url: 'http://127.0.0.1:$UP'}
  observability: {logLevel: warn}
YAML
taskset -c 1 "$DP" --config "$WORK/umw.yaml" --http-address "127.0.0.1:$UMW" --admin-address "127.0.0.1:$ADMIN" \
  --worker-threads 1 2> "$WORK/umw.log" & DP_PID=$!; PIDS+=($DP_PID)
until curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1; do sleep 0.01; done
until curl -sf "http://127.0.0.1:$UP/" >/dev/null 2>&1; do sleep 0.05; done
for port in $NGX $UMW; do
  until curl -sf --cacert "$WORK/ca.crt" "https://127.0.0.1:$port/" >/dev/null 2>&1; do sleep 0.05; done
done
NGINX_PIDS=$(nginx_pids "$NGX_MASTER")

run() { # close? port pid... → "rps p99_ms errors cpu_us_per_request wrk_busy"
  local close=$1 port=$2; shift 2
  local header=(); [ "$close" = close ] && header=(-H "Connection: close")
  taskset -c 0 wrk -t1 -c"$CONNECTIONS" -d2s "${header[@]}" "https://127.0.0.1:$port/" >/dev/null
  local before; before=$(ticks "$@")
  local core; core=$(cpu0)
  local out; out=$(taskset -c 0 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "${header[@]}" "https://127.0.0.1:$port/")
  local spent=$(( $(ticks "$@") - before ))
  read -r total idle <<<"$core"; read -r total2 idle2 <<<"$(cpu0)"
  out="$out
WRK_BUSY $(python3 -c 'import sys; t, i = int(sys.argv[2]) - int(sys.argv[1]), int(sys.argv[4]) - int(sys.argv[3]); print("%.2f" % (1 - i / max(t, 1)))' "$total" "$total2" "$idle" "$idle2")"
  echo "$out" | python3 -c '
import re, sys
text = sys.stdin.read()
spent, hz, duration = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
def ms(v, unit): return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p99 = ms(*re.search(r"\s99%\s+([\d.]+)(us|ms|s)", text).groups())
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
failed = (int(errors.group(1)) if errors else 0) + (sum(map(int, socket.groups())) if socket else 0)
busy = float(re.search(r"WRK_BUSY ([\d.]+)", text).group(1))
print("%.0f %.3f %d %.2f %.2f" % (rps, p99, failed, spent / hz * 1e6 / max(rps * duration, 1), busy))' "$spent" "$HZ" "$DURATION"
}

declare -A R
for load in keepalive close; do
  echo "== $load: $ROUNDS round(s) of ${DURATION}s, $CONNECTIONS connections, 1 proxy core" >&2
  for round in $(seq 1 "$ROUNDS"); do
    order="nginx umw"; [ $((round % 2)) -eq 0 ] && order="umw nginx"
    for who in $order; do
      # shellcheck disable=SC2086
      if [ "$who" = nginx ]; then line=$(run "$load" $NGX $NGINX_PIDS); else line=$(run "$load" $UMW $DP_PID); fi
      R[$load.$who]="${R[$load.$who]:-} $line"
      echo "round $round $who: $line (req/s p99_ms errors cpu_us/request wrk_core)" >&2
    done
  done
done
handshakes=$(curl -sf "http://127.0.0.1:$ADMIN/metrics" | awk '/^umw_tls_handshakes_total/ && !/ 0$/ {printf "%s ", $0}')
echo "data plane handshakes: $handshakes" >&2

python3 - "$ROUNDS" "$DURATION" "$CONNECTIONS" "${R[keepalive.nginx]}" "${R[keepalive.umw]}" "${R[close.nginx]}" "${R[close.umw]}" <<'PY'
import sys
rounds, duration, conns = sys.argv[1:4]
def parse(text):
    v = [float(x) for x in text.split()]
    rows = [v[i:i + 5] for i in range(0, len(v), 5)]
    return [sum(r[k] for r in rows) / len(rows) for k in range(5)]
kn, ku, cn, cu = (parse(t) for t in sys.argv[4:8])
print("| Figure | nginx `ssl` | umw-dataplane | ratio (umw/nginx) |")
print("|---|---|---|---|")
print(f"| Keep-alive HTTPS requests/s (wrk, {conns} connections, {rounds}×{duration}s, mean) | {kn[0]:,.0f} | {ku[0]:,.0f} | **{ku[0]/kn[0]:.2f}×** |")
print(f"| Proxy CPU per keep-alive request | {kn[3]:.1f} µs | {ku[3]:.1f} µs | {ku[3]/kn[3]:.2f}× |")
print(f"| p99 latency, keep-alive | {kn[1]:.3f} ms | {ku[1]:.3f} ms | {ku[1]/kn[1]:.2f}× |")
print(f"| wrk's core busy, keep-alive (1.00: it was the limit) | {kn[4]:.2f} | {ku[4]:.2f} | |")
print(f"| New TLS 1.3 connections/s (a handshake, mostly resumed, and one request each) | {cn[0]:,.0f} | {cu[0]:,.0f} | **{cu[0]/cn[0]:.2f}×** |")
print(f"| Proxy CPU per new connection | {cn[3]:.1f} µs | {cu[3]:.1f} µs | **{cu[3]/cn[3]:.2f}×** |")
print(f"| wrk's core busy, new connections | {cn[4]:.2f} | {cu[4]:.2f} | |")
print(f"| Errors (non-2xx and socket errors, all rounds) | {kn[2]*int(rounds) + cn[2]*int(rounds):.0f} | {ku[2]*int(rounds) + cu[2]*int(rounds):.0f} | |")
PY
