# Sourced by every benchmark: a work directory removed on exit with the processes started into PIDS,
# and the helpers they share.
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=../testenv/ports.sh
. "$ROOT/e2e/testenv/ports.sh"
wait_for() { # FILE PATTERN SECONDS
  for _ in $(seq 1 $(($3 * 10))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timed out waiting for '$2' in $1" >&2; exit 1
}
# nginx's master and its workers (the workers' command line does not name the configuration); not the
# cache loader, which exits a minute after the start.
nginx_pids() { echo "$1 $(pgrep -P "$1" -f 'worker process' | tr '\n' ' ')"; }
# CPU 0's total and idle ticks: two samples give how busy the load generator's core was in between.
cpu0() { awk '/^cpu0 / {print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat; }
# CPU time (user + system) in clock ticks of the given processes.
ticks() { local total=0; for p in "$@"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$total"; }
HZ=$(getconf CLK_TCK)
