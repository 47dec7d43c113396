#!/usr/bin/env bash
# Benchmark: the data plane as a reverse proxy against nginx, same upstream, same run.
#
#   make bench-gateway                      # DURATION=15 ROUNDS=2 CONNECTIONS=64
#   DURATION=5 ROUNDS=1 bash e2e/bench/gateway.sh
#
# Layout on a 2-core machine: the proxy under test alone on CPU 1 (one nginx worker; one data-plane
# worker thread), the upstream (an nginx answering a fixed 125-byte JSON) and the load generator on CPU 0.
# Measures, per proxy: requests/s and latency percentiles with wrk (closed loop, CONNECTIONS
# connections); added latency at 1000 requests/s with umw-load (open loop, against the upstream directly
# as the baseline); the proxy's CPU time per request, at a fixed rate (RATE, default 5000/s, ROUNDS × 10 s in alternating order; from
# /proc/<pid>/stat) and under wrk, with how busy wrk's own core was (1.00: the load generator was the
# limit); resident memory idle and after load; and the data plane's start-to-ready time.
# BEFORE=path/to/an/older/umw-dataplane adds that build as a third proxy, in the same rounds. H2C=1 makes
# the third proxy this build with `protocol: H2C` to the upstream instead (the upstream nginx then also
# speaks HTTP/2 with prior knowledge on a second port): HTTP/1.1 against h2c to the upstream, same run.
# PROXY_CORES=2 gives each proxy both cores (two nginx workers; two data-plane worker threads), shared
# with the load and the upstream: requests/s then says little, the CPU per request at a fixed rate says
# what running on two cores costs per request.
# Installs Debian's nginx and wrk when they are missing. Everything binds 127.0.0.1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DURATION="${DURATION:-15}"
ROUNDS="${ROUNDS:-2}"
CONNECTIONS="${CONNECTIONS:-64}"
RATE="${RATE:-5000}"
BEFORE="${BEFORE:-}"
H2C="${H2C:-}"
THIRD=before
if [ -n "$H2C" ]; then THIRD=h2c; fi
PROXY_CORES="${PROXY_CORES:-1}"
case "$PROXY_CORES" in
  1) PROXY_CPUS=1; PROXY_AFFINITY=10 ;;
  2) PROXY_CPUS=0,1; PROXY_AFFINITY="01 10" ;;
  *) echo "PROXY_CORES is 1 or 2 on this layout" >&2; exit 1 ;;
esac
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  command -v apt-get >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx wrk >/dev/null
fi
for tool in nginx wrk taskset python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install nginx wrk util-linux python3" >&2; exit 1; }
done
NGINX="$(command -v nginx)"

cargo build -q --release -p umw-dataplane --bin umw-dataplane -p umw-e2e --bin umw-load
DP="$TARGET/release/umw-dataplane"
LOAD="$TARGET/release/umw-load"

# shellcheck source=lib.sh
. "$ROOT/e2e/bench/lib.sh"
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
nginx_rss_kib() { local total=0; for p in $(nginx_pids "$1"); do total=$((total + $(rss_kib "$p"))); done; echo "$total"; }

reserve_port UP; reserve_port UP2; reserve_port NGX; reserve_port UMW; reserve_port ADMIN
BODY='{"products":[{"id":1,"name":"Kettle","price":29.0},{"id":2,"name":"Teapot","price":19.5},{"id":3,"name":"Mug","price":7.25}]}'

nginx_conf() { # name cpu body
  local dir="$WORK/$1"; mkdir -p "$dir/logs"
  cat > "$dir/nginx.conf" <<CONF
daemon off;
user root;
worker_processes $(echo "$2" | wc -w);
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

# The upstream: nginx answering a fixed body, on CPU 0.
conf=$(nginx_conf upstream 01 "server { listen 127.0.0.1:$UP; location / { default_type application/json; return 200 '$BODY'; } }
  server { listen 127.0.0.1:$UP2 http2; location / { default_type application/json; return 200 '$BODY'; } }")
taskset -c 0 "$NGINX" -c "$conf" -p "$WORK/upstream" & PIDS+=($!)

# nginx as the reverse proxy, one worker on CPU 1, keep-alive to the upstream.
conf=$(nginx_conf proxy "$PROXY_AFFINITY" "upstream app { server 127.0.0.1:$UP; keepalive 256; }
  server { listen 127.0.0.1:$NGX; location / { proxy_pass http://app; proxy_http_version 1.1;
    proxy_set_header Connection \"\"; proxy_set_header Host \$host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto \$scheme; } }")
taskset -c "$PROXY_CPUS" "$NGINX" -c "$conf" -p "$WORK/proxy" & NGX_MASTER=$!; PIDS+=($NGX_MASTER)

# The data plane, one worker thread on CPU 1, one catch-all route to the same upstream.
cat > "$WORK/umw.yaml" <<YAML
apiVersion: umw.dev/v1alpha1
kind: Middleware
metadata: {name: bench}
spec:
  routes:
    - name: all
      upstream: {url: 'http://127.0.0.1:$UP'}
  observability: {logLevel: warn}
YAML
sed -e "s|url: 'http://127.0.0.1:$UP'}|url: 'http://127.0.0.1:$UP2', protocol: H2C}|" "$WORK/umw.yaml" > "$WORK/umw-h2c.yaml"
THIRD_CONFIG="$WORK/umw.yaml"
if [ -n "$H2C" ]; then BEFORE="$DP"; THIRD_CONFIG="$WORK/umw-h2c.yaml"; fi
start_ns=$(date +%s%N)
taskset -c "$PROXY_CPUS" "$DP" --config "$WORK/umw.yaml" --http-address "127.0.0.1:$UMW" --admin-address "127.0.0.1:$ADMIN" \
  --worker-threads "$PROXY_CORES" 2> "$WORK/umw.log" & DP_PID=$!; PIDS+=($DP_PID)
until curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1; do sleep 0.002; done
ready_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
if [ -n "$BEFORE" ]; then
  reserve_port OLD; reserve_port OLD_ADMIN
  taskset -c "$PROXY_CPUS" "$BEFORE" --config "$THIRD_CONFIG" --http-address "127.0.0.1:$OLD" \
    --admin-address "127.0.0.1:$OLD_ADMIN" --worker-threads "$PROXY_CORES" 2> "$WORK/before.log" & OLD_PID=$!; PIDS+=($OLD_PID)
  until curl -sf "http://127.0.0.1:$OLD_ADMIN/readyz" >/dev/null 2>&1; do sleep 0.01; done
fi
for port in $UP $NGX; do until curl -sf "http://127.0.0.1:$port/" >/dev/null 2>&1; do sleep 0.05; done; done
sleep 1
umw_idle=$(rss_kib $DP_PID); nginx_idle=$(nginx_rss_kib "$NGX_MASTER")
# The anonymous part (heap and stacks; the rest of the resident set is the mapped binary and libraries).
umw_anon=$(awk '/^RssAnon/ {print $2}' "/proc/$DP_PID/status")

# Start-to-ready of fresh processes (the first above included), median of 5.
readies=("$ready_ms")
for _ in 1 2 3 4; do
  reserve_port p; reserve_port a; t0=$(date +%s%N)
  "$DP" --config "$WORK/umw.yaml" --http-address "127.0.0.1:$p" --admin-address "127.0.0.1:$a" 2>/dev/null & pid=$!
  until curl -sf "http://127.0.0.1:$a/readyz" >/dev/null 2>&1; do sleep 0.002; done
  readies+=($(( ($(date +%s%N) - t0) / 1000000 ))); kill $pid; wait $pid 2>/dev/null || true
done
ready_median=$(printf '%s\n' "${readies[@]}" | sort -n | sed -n 3p)

wrk_run() { # port pid... → "rps p50_ms p99_ms errors proxy_cpu_us_per_request wrk_core_busy"
  local port=$1; shift
  taskset -c 0 wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$port/" >/dev/null
  local before; before=$(ticks "$@")
  local core; core=$(cpu0)
  local out; out=$(taskset -c 0 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:$port/")
  local spent=$(( $(ticks "$@") - before ))
  # How busy the load generator's core was (wrk and the upstream): 1.00 means it, not the proxy, was the limit.
  read -r total idle <<<"$core"; read -r total2 idle2 <<<"$(cpu0)"
  out="$out
WRK_BUSY $(python3 -c 'import sys; t, i = int(sys.argv[2]) - int(sys.argv[1]), int(sys.argv[4]) - int(sys.argv[3]); print("%.2f" % (1 - i / max(t, 1)))' "$total" "$total2" "$idle" "$idle2")"
  echo "$out" | python3 -c '
import re, sys
text = sys.stdin.read()
spent, hz, duration = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
def ms(v, unit): return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50, p99 = (ms(*re.search(r"\s" + p + r"%\s+([\d.]+)(us|ms|s)", text).groups()) for p in ("50", "99"))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
busy = float(re.search(r"WRK_BUSY ([\d.]+)", text).group(1))
cpu_us = spent / hz * 1e6 / max(rps * duration, 1)
print("%.0f %.3f %.3f %s %.2f %.2f" % (rps, p50, p99, errors.group(1) if errors else 0, cpu_us, busy))' "$spent" "$HZ" "$DURATION"
}
NGINX_PIDS=$(nginx_pids "$NGX_MASTER")

echo "== wrk: $ROUNDS round(s) of ${DURATION}s, $CONNECTIONS connections, $PROXY_CORES proxy core(s)" >&2
declare -a N_RPS U_RPS N_P50 U_P50 N_P99 U_P99 N_CPU U_CPU N_BUSY U_BUSY B_RPS B_CPU B_BUSY
for round in $(seq 1 "$ROUNDS"); do
  # shellcheck disable=SC2086
  read -r rps p50 p99 err cpu busy < <(wrk_run $NGX $NGINX_PIDS)
  N_RPS+=($rps); N_P50+=($p50); N_P99+=($p99); N_CPU+=($cpu); N_BUSY+=($busy)
  echo "round $round nginx: $rps req/s p50 ${p50}ms p99 ${p99}ms non-2xx $err, ${cpu} µs CPU/request, wrk core ${busy}" >&2
  read -r rps p50 p99 err cpu busy < <(wrk_run $UMW $DP_PID)
  U_RPS+=($rps); U_P50+=($p50); U_P99+=($p99); U_CPU+=($cpu); U_BUSY+=($busy)
  echo "round $round umw:   $rps req/s p50 ${p50}ms p99 ${p99}ms non-2xx $err, ${cpu} µs CPU/request, wrk core ${busy}" >&2
  if [ -n "$BEFORE" ]; then
    read -r rps p50 p99 err cpu busy < <(wrk_run $OLD $OLD_PID); B_RPS+=($rps); B_CPU+=($cpu); B_BUSY+=($busy)
    echo "round $round $THIRD: $rps req/s p50 ${p50}ms p99 ${p99}ms non-2xx $err, ${cpu} µs CPU/request, wrk core ${busy}" >&2
  fi
done
umw_hwm=$(hwm_kib $DP_PID); nginx_after=$(nginx_rss_kib "$NGX_MASTER")

mean() { python3 -c 'import sys; v=[float(x) for x in sys.argv[1:]]; print(f"{sum(v)/len(v):.3f}")' "$@"; }
n_rps=$(mean "${N_RPS[@]}"); u_rps=$(mean "${U_RPS[@]}")
n_p50=$(mean "${N_P50[@]}"); u_p50=$(mean "${U_P50[@]}"); n_p99=$(mean "${N_P99[@]}"); u_p99=$(mean "${U_P99[@]}")
n_cpu=$(mean "${N_CPU[@]}"); u_cpu=$(mean "${U_CPU[@]}"); n_busy=$(mean "${N_BUSY[@]}"); u_busy=$(mean "${U_BUSY[@]}")
b_rps=0; b_cpu=0; b_busy=0
if [ -n "$BEFORE" ]; then b_rps=$(mean "${B_RPS[@]}"); b_cpu=$(mean "${B_CPU[@]}"); b_busy=$(mean "${B_BUSY[@]}"); fi

echo "== CPU per request at a fixed $RATE req/s, $ROUNDS round(s) of 10s" >&2
fixed_cpu() { # port pid... → µs of the proxy's CPU per request sent
  local port=$1; shift
  local before; before=$(ticks "$@")
  local result; result=$(taskset -c 0 "$LOAD" --url "http://127.0.0.1:$port/" --rate "$RATE" --duration 10s --connections 16)
  local spent=$(( $(ticks "$@") - before ))
  python3 -c 'import json, sys; r = json.loads(sys.argv[1]); print("%.2f %d" % (int(sys.argv[2]) / int(sys.argv[3]) * 1e6 / max(r["sent"], 1), r["errors"]))' "$result" "$spent" "$HZ"
}
# ROUNDS rounds, the order reversed every other round (a drift of the machine then favours no one); the mean.
n_all=(); u_all=(); b_all=(); n_fixed_err=0; u_fixed_err=0
for round in $(seq 1 "$ROUNDS"); do
  order="n u b"; [ $((round % 2)) -eq 0 ] && order="b u n"
  for who in $order; do
    case $who in
      # shellcheck disable=SC2086
      n) read -r v e < <(fixed_cpu $NGX $NGINX_PIDS); n_all+=("$v"); n_fixed_err=$((n_fixed_err + e)) ;;
      u) read -r v e < <(fixed_cpu $UMW $DP_PID); u_all+=("$v"); u_fixed_err=$((u_fixed_err + e)) ;;
      b) [ -n "$BEFORE" ] || continue; read -r v _ < <(fixed_cpu $OLD $OLD_PID); b_all+=("$v") ;;
    esac
  done
  echo "round $round at $RATE req/s: nginx ${n_all[-1]}, umw ${u_all[-1]}${BEFORE:+, $THIRD ${b_all[-1]}} µs/request" >&2
done
mean() { printf '%s\n' "$@" | awk '{ s += $1; n++ } END { printf "%.2f", n ? s / n : 0 }'; }
n_fixed=$(mean "${n_all[@]}"); u_fixed=$(mean "${u_all[@]}"); b_fixed=0
if [ -n "$BEFORE" ]; then b_fixed=$(mean "${b_all[@]}"); fi
echo "nginx ${n_fixed} µs/request ($n_fixed_err errors), umw ${u_fixed} µs/request ($u_fixed_err errors)${BEFORE:+, $THIRD $b_fixed µs/request}" >&2

echo "== umw-load: 1000 req/s for 10s, direct and through each proxy" >&2
load() { taskset -c 0 "$LOAD" --url "http://127.0.0.1:$1/" --rate 1000 --duration 10s --connections 16; }
direct=$(load $UP); via_nginx=$(load $NGX); via_umw=$(load $UMW)
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

python3 - "$n_rps" "$u_rps" "$n_p50" "$u_p50" "$n_p99" "$u_p99" "$direct" "$via_nginx" "$via_umw" \
  "$umw_idle" "$umw_hwm" "$nginx_idle" "$nginx_after" "$ready_median" "$CONNECTIONS" "$DURATION" "$ROUNDS" \
  "$n_cpu" "$u_cpu" "$n_busy" "$u_busy" "$n_fixed" "$u_fixed" "$RATE" "$b_rps" "$b_cpu" "$b_busy" "$b_fixed" "$THIRD" "$umw_anon" <<'PY'
import json, sys
a = sys.argv[1:]
n_rps, u_rps, n_p50, u_p50, n_p99, u_p99 = map(float, a[0:6])
direct, nginx, umw = (json.loads(x) for x in a[6:9])
umw_idle, umw_hwm, nginx_idle, nginx_after, ready = map(int, a[9:14])
conns, duration, rounds = a[14:17]
n_cpu, u_cpu, n_busy, u_busy, n_fixed, u_fixed = map(float, a[17:23])
rate = a[23]
b_rps, b_cpu, b_busy, b_fixed = map(float, a[24:28])
third = "The same build, h2c to the upstream" if a[28] == "h2c" else "The build given as BEFORE"
versus = "HTTP/1.1 upstream / h2c" if a[28] == "h2c" else "now/before"
print(f"| Figure | nginx | umw-dataplane | ratio (umw/nginx) |")
print(f"|---|---|---|---|")
print(f"| Requests/s (wrk, {conns} connections, {rounds}×{duration}s, mean) | {n_rps:,.0f} | {u_rps:,.0f} | **{u_rps/n_rps:.2f}×** |")
print(f"| Proxy CPU per request, at {rate} req/s (umw-load, {rounds}×10 s, mean) | {n_fixed:.1f} µs | {u_fixed:.1f} µs | **{u_fixed/n_fixed:.2f}×** |")
print(f"| Proxy CPU per request under wrk | {n_cpu:.1f} µs | {u_cpu:.1f} µs | {u_cpu/n_cpu:.2f}× |")
print(f"| Load generator's core busy under wrk (wrk and the upstream; 1.00: it was the limit) | {n_busy:.2f} | {u_busy:.2f} | |")
if b_rps:
    print(f"| {third}: requests/s, CPU/request at {rate} req/s, under wrk, wrk's core | | {b_rps:,.0f}, {b_fixed:.1f} µs, {b_cpu:.1f} µs, {b_busy:.2f} | {versus}: {u_rps/b_rps:.2f}× req/s, {u_fixed/b_fixed:.2f}× CPU |")
print(f"| p50 latency under that load | {n_p50:.3f} ms | {u_p50:.3f} ms | {u_p50/n_p50:.2f}× |")
print(f"| p99 latency under that load | {n_p99:.3f} ms | {u_p99:.3f} ms | {u_p99/n_p99:.2f}× |")
for p in ("p50", "p99"):
    d = direct[p + "_us"]
    print(f"| Added {p} latency at 1000 req/s (direct {d} µs) | {(nginx[p+'_us']-d)/1000:.3f} ms | {(umw[p+'_us']-d)/1000:.3f} ms | |")
print(f"| Errors at 1000 req/s | {nginx['errors']} | {umw['errors']} | |")
print(f"| Resident memory, idle | {nginx_idle/1024:.1f} MiB (master + worker) | {umw_idle/1024:.1f} MiB ({int(sys.argv[-1])/1024:.1f} MiB anonymous) | |")
print(f"| Resident memory, after the load (umw: peak) | {nginx_after/1024:.1f} MiB | {umw_hwm/1024:.1f} MiB | |")
print(f"| Start to ready (median of 5) | | {ready} ms | |")
PY
