#!/usr/bin/env bash
# Runs the workspace's tests and ends with one summary line over every test binary:
#   tests: N passed, N failed, N skipped
# then waits for the control planes (and the real node) that the e2e binaries started to stop: each stops
# by itself once its test binary exits, and nothing of the suite is left running when this returns. A stop
# that reports an error or a warning (a real node that did not put the host back) fails the run.
set -uo pipefail
log=$(mktemp)
started=$(mktemp)
trap 'rm -f "$log" "$started"' EXIT
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^ignored/) s += $(i-1) } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
for _ in $(seq 1 120); do
  running=""
  for pid_file in "${TMPDIR:-/tmp}"/umw-e2e-*/reaper.pid "${TMPDIR:-/tmp}"/umw-e2e-*/stopping; do
    [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null && running=1
  done
  [ -z "$running" ] && break
  sleep 1
done
# What the stops said: a node that did not stop cleanly (the host not put back as it was) fails the run.
# (Only the stops of this run: their logs are newer than the file made when it started.)
for stop_log in $(find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'umw-e2e-*.stop.log' -newer "$started"); do
  stopping="${stop_log%.stop.log}/stopping"
  if [ -f "$stopping" ] && kill -0 "$(cat "$stopping")" 2>/dev/null; then
    echo "still stopping after 2 minutes: ${stop_log%.stop.log}" >&2
    status=1
    continue
  fi
  if grep -qE 'error|warning' "$stop_log"; then
    echo "the test environment of ${stop_log%.stop.log} did not stop cleanly:" >&2
    cat "$stop_log" >&2
    status=1
  fi
  rm -f "$stop_log"
done
exit "$status"
