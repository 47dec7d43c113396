#!/usr/bin/env bash
# Brings up every real dependency the tests use, on loopback ports chosen at run time, and writes DIR/env
# (KUBECONFIG, the tools' PATH, and one address variable per service) for tests and people to source.
#
#   e2e/testenv/up.sh DIR [--owner-pid PID]   # with --owner-pid, everything stops when PID exits
#   e2e/testenv/up.sh --down DIR
#
# Services, each started by a function below that appends its variables to DIR/env:
#   controlplane  etcd + kube-apiserver + kube-controller-manager (controlplane.sh)
# Redis, PostgreSQL and Kafka join this list with the cache, commands and events releases: each gets a
# `start_<name> DIR` function here, a `stop_<name> DIR` one, and a line in SERVICES.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SERVICES=(controlplane)

start_controlplane() { bash "$HERE/controlplane.sh" start "$1" ${2:+--owner-pid "$2"}; }
stop_controlplane() { bash "$HERE/controlplane.sh" stop "$1"; }

if [ "${1:-}" = "--down" ]; then
  for service in "${SERVICES[@]}"; do "stop_$service" "$2"; done
  exit 0
fi
[ $# -ge 1 ] || { echo "usage: $0 DIR [--owner-pid PID] | --down DIR" >&2; exit 2; }
dir=$1; owner=""
[ "${2:-}" = "--owner-pid" ] && owner=${3:-}
bash "$HERE/build-tools.sh"
for service in "${SERVICES[@]}"; do "start_$service" "$dir" "$owner"; done
