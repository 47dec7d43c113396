#!/usr/bin/env bash
# Starts and stops a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) on
# loopback ports chosen at run time, as controller-runtime's envtest does, plus the controllers.
#
#   controlplane.sh start DIR [--owner-pid PID] [--address IP]
#       writes DIR/kubeconfig, DIR/env; with --owner-pid the control plane stops by itself when PID exits;
#       with --address the API server listens on IP (an address of the real node's bridge, which pods
#       reach) instead of 127.0.0.1
#   controlplane.sh stop DIR
#
# With UMW_TESTENV_REMOVE=1 and --owner-pid, DIR is removed after the stop unless DIR/keep exists.
#
# DIR/operator.kubeconfig authenticates as user `umw-operator` (group system:masters): the API server's
# audit log (DIR/audit.log) records every request of that user, which tests use to count writes.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"
# shellcheck source=ports.sh
. "$HERE/ports.sh"
BIN="$UMW_TESTENV_BIN"

log() { printf '[controlplane] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }


# Everything: a real node first (node.sh), while the pods' mounts are still there to be undone.
stop() {
  if [ -d "$1/node" ]; then bash "$HERE/node.sh" stop "$1" || log "error: the node of $1 did not stop cleanly"; fi
  stop_controlplane "$1"
}

stop_controlplane() {
  local dir=$1 pid
  # Data-plane processes of the process kubelet, should it have died without stopping them.
  for file in "$dir"/pods/*/dataplane.pid; do
    [ -f "$file" ] || continue
    pid=$(cat "$file")
    # Only if that pid is still a data plane (pids are reused).
    if grep -qa umw-dataplane "/proc/$pid/cmdline" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -f "$file"
  done
  for name in kube-controller-manager kube-apiserver etcd reaper; do
    [ -f "$dir/$name.pid" ] || continue
    pid=$(cat "$dir/$name.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/$name.pid"
  done
}

write_kubeconfig() {
  local file=$1 user=$2 port=$3 dir=$4 address=${5:-127.0.0.1}
  cat > "$file" <<KC
apiVersion: v1
kind: Config
clusters:
- name: umw-test
  cluster:
    server: https://$address:$port
    certificate-authority: $dir/pki/ca.crt
users:
- name: $user
  user:
    client-certificate: $dir/pki/$user.crt
    client-key: $dir/pki/$user.key
contexts:
- name: umw-test
  context: {cluster: umw-test, user: $user, namespace: default}
current-context: umw-test
KC
}

certs() {
  local pki=$1 address=$2
  mkdir -p "$pki"; cd "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=umw-test-ca" 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  cat > serving.ext <<EXT
subjectAltName=IP:$address,IP:127.0.0.1,IP:$UMW_KUBERNETES_SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth
EXT
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 30 -extfile serving.ext 2>/dev/null
  echo "extendedKeyUsage=clientAuth" > client.ext
  # (kube-apiserver-kubelet-client: the API server's identity towards kubelets, for logs and exec.)
  for user in admin umw-operator kube-apiserver-kubelet-client; do
    openssl req -newkey rsa:2048 -nodes -keyout "$user.key" -out "$user.csr" -subj "/O=system:masters/CN=$user" 2>/dev/null
    openssl x509 -req -in "$user.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$user.crt" -days 30 -extfile client.ext 2>/dev/null
  done
  cd - >/dev/null
}

start() {
  local dir=$1 owner=${2:-} address=${3:-127.0.0.1}
  for b in etcd kube-apiserver kube-controller-manager kubectl; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is missing: run e2e/testenv/build-tools.sh (make testenv) first"
  done
  command -v openssl >/dev/null || die "openssl is missing (apt-get install openssl)"
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  stop_controlplane "$dir"
  rm -rf "$dir/etcd-data" "$dir/pki" "$dir"/*.log
  certs "$dir/pki" "$address"

  local etcd_port peer_port api_port
  reserve_port etcd_port; reserve_port peer_port; reserve_port api_port "$address"

  # Each server gets its own session, so that a Ctrl-C meant for the caller (make dev) does not stop the
  # control plane before the operator has released its lease; the reaper below stops it afterwards.
  setsid "$BIN/etcd" --name default --data-dir "$dir/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "default=http://127.0.0.1:$peer_port" --unsafe-no-fsync \
    --listen-metrics-urls "" --log-level warn > "$dir/etcd.log" 2>&1 &
  echo $! > "$dir/etcd.pid"

  cat > "$dir/audit-policy.yaml" <<AP
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: [umw-operator]
- level: None
AP

  setsid "$BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$address" --advertise-address "$address" --secure-port "$api_port" \
    --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
    --client-ca-file "$dir/pki/ca.crt" \
    --kubelet-client-certificate "$dir/pki/kube-apiserver-kubelet-client.crt" \
    --kubelet-client-key "$dir/pki/kube-apiserver-kubelet-client.key" \
    --service-cluster-ip-range "$UMW_SERVICE_CIDR" \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$dir/pki/sa.pub" \
    --service-account-signing-key-file "$dir/pki/sa.key" \
    --audit-policy-file "$dir/audit-policy.yaml" --audit-log-path "$dir/audit.log" \
    --audit-log-maxsize 200 \
    --allow-privileged=true \
    --v=1 > "$dir/kube-apiserver.log" 2>&1 &
  echo $! > "$dir/kube-apiserver.pid"

  write_kubeconfig "$dir/kubeconfig" admin "$api_port" "$dir" "$address"
  write_kubeconfig "$dir/operator.kubeconfig" umw-operator "$api_port" "$dir" "$address"

  local ok=""
  for _ in $(seq 1 240); do
    if "$BIN/kubectl" --kubeconfig "$dir/kubeconfig" get --raw /readyz >/dev/null 2>&1; then ok=1; break; fi
    kill -0 "$(cat "$dir/kube-apiserver.pid")" 2>/dev/null || break
    sleep 0.25
  done
  if [ -z "$ok" ]; then
    tail -30 "$dir/kube-apiserver.log" >&2 || true
    stop_controlplane "$dir"; die "kube-apiserver did not become ready (log: $dir/kube-apiserver.log)"
  fi

  setsid "$BIN/kube-controller-manager" --kubeconfig "$dir/kubeconfig" \
    --authentication-kubeconfig "$dir/kubeconfig" --authorization-kubeconfig "$dir/kubeconfig" \
    --leader-elect=false --secure-port 0 \
    --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
    --controllers '*,-nodelifecycle,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route' \
    --concurrent-gc-syncs 5 --flex-volume-plugin-dir "$dir/flex-volume-plugins" \
    --v=1 > "$dir/kube-controller-manager.log" 2>&1 &
  echo $! > "$dir/kube-controller-manager.pid"

  cat > "$dir/env" <<ENV
export KUBECONFIG=$dir/kubeconfig
export UMW_TESTENV_DIR=$dir
export PATH=$BIN:\$PATH
ENV

  if [ -n "$owner" ]; then
    # Stops everything once the owning process (a test binary) exits, however it exits. With
    # UMW_TESTENV_REMOVE=1 the directory goes too, unless something left a file named `keep` in it (the e2e
    # harness does when a test fails, so that its logs stay for reading).
    local remove="" stop_log="$dir/stop.log"
    # (Never while something is still mounted under it. What the stop said then goes beside DIR, to
    # DIR.stop.log, which cargo-test.sh reads and removes.)
    if [ "${UMW_TESTENV_REMOVE:-}" = 1 ]; then
      remove="[ -e '$dir/keep' ] || grep -qF ' $dir/' /proc/self/mounts || rm -rf '$dir'"
      stop_log="$dir.stop.log"
    fi
    # (DIR/stopping holds the reaper's pid while it stops everything, for whoever waits for that.)
    setsid bash -c "while kill -0 $owner 2>/dev/null; do sleep 1; done; rm -f '$dir/reaper.pid'; echo \$\$ > '$dir/stopping'; '$HERE/controlplane.sh' stop '$dir'; rm -f '$dir/stopping'; $remove" \
      > "$stop_log" 2>&1 < /dev/null &
    echo $! > "$dir/reaper.pid"
  fi
  log "control plane up: KUBECONFIG=$dir/kubeconfig (kube-apiserver https://$address:$api_port)"
}

case "${1:-}" in
  start)
    [ $# -ge 2 ] || die "usage: $0 start DIR [--owner-pid PID] [--address IP]"
    dir=$2; owner=""; address=127.0.0.1; shift 2
    while [ $# -gt 0 ]; do
      case "$1" in
        --owner-pid) owner=$2; shift 2 ;;
        --address) address=$2; shift 2 ;;
        *) die "unknown option $1" ;;
      esac
    done
    start "$dir" "$owner" "$address" ;;
  stop)
    [ $# -ge 2 ] || die "usage: $0 stop DIR"
    stop "$2"; log "control plane in $2 stopped" ;;
  *) die "usage: $0 start|stop DIR" ;;
esac
