#!/usr/bin/env bash
# Runs the workspace's tests and ends with one summary line over every test binary:
#   tests: N passed, N failed, N skipped
# then waits for the control planes (and the real node) that the e2e binaries started to stop: each stops
# by itself once its test binary exits, and nothing of the suite is left running when this returns.
set -uo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
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
exit "$status"
