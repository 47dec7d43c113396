#!/usr/bin/env bash
# Brings up the test control plane on loopback ports chosen at run time and writes DIR/env (KUBECONFIG,
# the tools' PATH) for tests and people to source. With --node, also a real node (node.sh): the API
# server then listens on the node's bridge address, which pods reach, and DIR/env names the node.
#
#   e2e/testenv/up.sh DIR [--owner-pid PID] [--node]   # with --owner-pid, everything stops when PID exits
#   e2e/testenv/up.sh --down DIR
#
# Kafka, Redis and PostgreSQL are started by the tests themselves (one private server per test).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"

if [ "${1:-}" = "--down" ]; then
  # Stops the node too, when there is one.
  bash "$HERE/controlplane.sh" stop "$2"
  exit 0
fi
[ $# -ge 1 ] || { echo "usage: $0 DIR [--owner-pid PID] [--node] | --down DIR" >&2; exit 2; }
dir=$1; shift
owner=(); node=""
while [ $# -gt 0 ]; do
  case "$1" in
    --owner-pid) owner=(--owner-pid "$2"); shift 2 ;;
    --node) node=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
bash "$HERE/build-tools.sh"
if [ -z "$node" ]; then
  bash "$HERE/controlplane.sh" start "$dir" "${owner[@]}"
  exit 0
fi
bash "$HERE/node.sh" bridge "$dir"
bash "$HERE/controlplane.sh" start "$dir" "${owner[@]}" --address "$UMW_NODE_IP" ||
  { bash "$HERE/node.sh" stop "$dir"; exit 1; }
bash "$HERE/node.sh" start "$dir" || { bash "$HERE/controlplane.sh" stop "$dir"; exit 1; }
