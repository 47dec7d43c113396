#!/usr/bin/env bash
# Operator benchmark (docs/benchmarks.md): apply N Middlewares at once to a real control plane and measure
#   - the time until every one has its four children and a status,
#   - the operator's peak resident memory,
#   - the write requests it sends during a steady state (with resyncs), from the API server's audit log.
#
#   make bench                              # N=200, a 2-minute steady state
#   N=50 STEADY_SECONDS=30 bash e2e/bench/operator.sh
#   OPERATOR_ARGS="--max-concurrent-reconciles 64" N=1000 bash e2e/bench/operator.sh   # extra operator flags
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
N="${N:-200}"
STEADY_SECONDS="${STEADY_SECONDS:-120}"
RESYNC="${RESYNC:-60s}"
. "$ROOT/e2e/testenv/versions.sh"
K="$UMW_TESTENV_BIN/kubectl"

cargo build --release -q -p umw-operator --manifest-path "$ROOT/Cargo.toml"
OPERATOR="${CARGO_TARGET_DIR:-$ROOT/target}/release/umw-operator"

DIR=$(mktemp -d)
bash "$ROOT/e2e/testenv/controlplane.sh" start "$DIR" --owner-pid $$ >/dev/null 2>&1
export KUBECONFIG="$DIR/kubeconfig"
"$K" apply --server-side -f "$ROOT/crds/manifests/crds.yaml" >/dev/null
"$K" wait --for=condition=Established crd --all --timeout=60s >/dev/null
"$K" create namespace bench >/dev/null

KUBECONFIG="$DIR/operator.kubeconfig" RUST_LOG=warn "$OPERATOR" --namespace bench --lease-namespace bench \
  --admin-address 127.0.0.1:0 --resync "$RESYNC" ${OPERATOR_ARGS:-} > "$DIR/operator.log" 2>&1 &
OP_PID=$!
trap 'kill $OP_PID 2>/dev/null || true' EXIT
sleep 2

python3 - "$N" > "$DIR/middlewares.yaml" <<'PY'
import sys
for i in range(int(sys.argv[1])):
    print(f"""---
apiVersion: umw.dev/v1alpha1
kind: Middleware
metadata:
  name: mw-{i:03d}
spec:
  replicas: 2
  routes:
  - name: api
    match: {{pathPrefix: /api}}
    upstream: {{service: {{name: api-{i:03d}, port: 8080}}, }}
    timeout: 5s
  disruptionBudget: {{maxUnavailable: 1}}""")
PY

count() {
  "$K" -n bench get "$1" -l app.kubernetes.io/managed-by=umw-operator -o name 2>/dev/null | wc -l
}
start=$(date +%s.%N)
"$K" -n bench apply -f "$DIR/middlewares.yaml" >/dev/null
while :; do
  with_status=$("$K" -n bench get middlewares -o jsonpath='{range .items[*]}{.status.observedGeneration}{"\n"}{end}' | grep -c '^1$' || true)
  if [ "$with_status" -ge "$N" ] && [ "$(count deployments)" -ge "$N" ] && [ "$(count configmaps)" -ge "$N" ] \
     && [ "$(count services)" -ge "$N" ] && [ "$(count serviceaccounts)" -ge "$N" ] && [ "$(count pdb)" -ge "$N" ]; then
    break
  fi
  sleep 0.5
done
converged=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")

# Writes by the operator in the audit log since a time, as "resource verb" counts.
writes_since() {
  python3 - "$DIR/audit.log" "$1" <<'PY'
import collections, json, sys
since, counts = sys.argv[2], collections.Counter()
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e["user"]["username"] != "umw-operator" or e["verb"] not in ("create", "update", "patch", "delete"):
        continue
    if e["objectRef"].get("resource") == "leases" or e["requestReceivedTimestamp"] < since:
        continue
    sub = e["objectRef"].get("subresource")
    counts[e["objectRef"]["resource"] + ("/" + sub if sub else "") + " " + e["verb"]] += 1
print(sum(counts.values()), " ".join(f"{k}={v}" for k, v in sorted(counts.items())))
PY
}
# The rollout goes on after convergence (the controller-manager creates 2 pods per Deployment and the
# operator reports replica counts): the steady state starts once the operator has been quiet for 10s.
settle_start=$(date +%s)
while :; do
  ten_ago=$(date -u -d '-10 seconds' +%Y-%m-%dT%H:%M:%S.%6NZ)
  [ "$(writes_since "$ten_ago" | cut -d' ' -f1)" = "0" ] && break
  [ $(( $(date +%s) - settle_start )) -gt 300 ] && { echo "the operator never went quiet" >&2; break; }
  sleep 2
done
settled=$(( $(date +%s) - settle_start ))
steady_from=$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ)
sleep "$STEADY_SECONDS"
writes=$(writes_since "$steady_from")
peak_kib=$(awk '/VmHWM/ {print $2}' "/proc/$OP_PID/status")
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$OP_PID/status")
cpu_ticks=$(awk '{print $14 + $15}' "/proc/$OP_PID/stat")
echo "middlewares:            $N (each: ConfigMap, ServiceAccount, Service, Deployment, PodDisruptionBudget)"
echo "time to converge:       ${converged}s (apply of all $N until every child exists and every status is written)"
echo "operator peak RSS:      $((peak_kib / 1024)) MiB (now $((rss_kib / 1024)) MiB)"
echo "operator CPU in all:    $((cpu_ticks / $(getconf CLK_TCK))) s"
echo "rollout settled after:  ${settled}s more (the operator's last replica-count updates)"
echo "steady-state writes:    $writes in ${STEADY_SECONDS}s with --resync $RESYNC (leader-lease renewals excluded)"
echo "all writes:             $(writes_since 2000-01-01T00:00:00Z)"
