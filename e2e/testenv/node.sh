#!/usr/bin/env bash
# A real Kubernetes node joined to the test control plane: kubelet (built like the control plane, see
# build-tools.sh) on containerd and runc from Debian, the CNI bridge and host-local plugins, the pause
# image built here, kube-proxy (nftables mode) for Services, CoreDNS for their names, and kube-scheduler
# (the test control plane has none). The images the pods run are the project's own, built from its
# Dockerfiles (images.sh) and imported into containerd: nothing is pulled.
#
#   node.sh bridge DIR   # the node's bridge and address, before the control plane starts on that address
#   node.sh start DIR    # the node, for the control plane in DIR (up.sh --node does all three steps)
#   node.sh stop DIR     # everything stopped and the host restored (controlplane.sh stop calls it)
#
# The node is named `localhost`, its IP is ${UMW_NODE_IP} on the bridge ${UMW_NODE_BRIDGE}, pods get
# addresses in ${UMW_NODE_SUBNET}, Services in ${UMW_SERVICE_CIDR} (the API server's range) and names under
# cluster.local from CoreDNS on the node IP. Servers that pods must reach (Kafka, Redis, PostgreSQL,
# upstreams) listen on the node IP; the host reaches pod IPs and, through kube-proxy, ClusterIPs.
#
# What it changes on the host, all undone by `stop`: the bridge and its routes; forwarding on the bridge
# only, with an nftables table (inet umw-test-node) that drops whatever would cross from the bridge to
# another interface or back, and whatever reaches the node IP from anywhere but the bridge and loopback
# (pods reach each other, the host and ClusterIPs; nothing outside reaches the servers on the node IP);
# kube-proxy's nftables tables; cgroups under kubepods; the kernel settings in SYSCTLS below (kubelet
# insists on vm.overcommit_memory=1, kernel.panic=10, kernel.panic_on_oops=1), put back to the values
# recorded before; and the paths in HOST_PATHS, which kubelet, containerd and the CNI plugins use
# whatever they are told, removed when they did not exist before. One node runs on a machine at a time:
# the bridge carries the directory of the node that owns it, and `stop` leaves the host alone for a
# directory that does not own it. Needs the bridge netfilter hooks (bridge-nf-call-iptables=1), as every
# Kubernetes node does, for a pod to reach another pod on this node through a ClusterIP.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"
# shellcheck source=ports.sh
. "$HERE/ports.sh"
BIN="$UMW_TESTENV_BIN"
BRIDGE=$UMW_NODE_BRIDGE
SUBNET=$UMW_NODE_SUBNET
NODE_IP=$UMW_NODE_IP
SERVICE_CIDR=$UMW_SERVICE_CIDR
NODE_NAME=localhost
# Kernel settings that kubelet, kube-proxy or this script may change; `stop` puts back what it recorded.
# (Writing net.ipv4.ip_forward resets accept_redirects and the forwarding defaults: those come after it.)
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys
  kernel.keys.root_maxbytes net.ipv4.ip_forward net.ipv4.conf.all.forwarding net.ipv4.conf.default.forwarding
  net.ipv4.conf.all.accept_redirects net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables
  net.bridge.bridge-nf-call-ip6tables net.netfilter.nf_conntrack_max
  net.netfilter.nf_conntrack_tcp_timeout_established net.netfilter.nf_conntrack_tcp_timeout_close_wait)
# Paths outside DIR that kubelet, containerd or the CNI plugins write whatever they are told.
HOST_PATHS=(/var/lib/kubelet /var/log/containers /var/log/pods /var/lib/cni /run/containerd /etc/cni /opt/cni)

log() { printf '[node] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }


ctr_() { ctr --address "$ND/containerd/containerd.sock" --namespace k8s.io "$@"; }
kubectl_() { "$BIN/kubectl" --kubeconfig "$DIR/kubeconfig" "$@"; }

# Waits up to $1 tenths of a second for the command that follows to succeed.
wait_for() {
  local tries=$1; shift
  for _ in $(seq 1 "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

# Starts a daemon in its own session, recording its pid in $ND/NAME.pid and its output in $ND/NAME.log.
daemon() {
  local name=$1; shift
  setsid "$@" > "$ND/$name.log" 2>&1 < /dev/null &
  echo $! > "$ND/$name.pid"
}

alive() { [ -f "$ND/$1.pid" ] && kill -0 "$(cat "$ND/$1.pid")" 2>/dev/null; }

fail_with_log() {
  local name=$1; shift
  tail -25 "$ND/$name.log" >&2 || true
  die "$* (log: $ND/$name.log)"
}

preflight() {
  [ "$(id -u)" = 0 ] || die "the real node needs root (containerd, runc, network namespaces, cgroups)"
  local missing=() tool
  for tool in containerd ctr runc nft ip; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || missing+=(containernetworking-plugins)
  [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: run e2e/testenv/packages.sh (make testenv does)"
  for tool in kubelet kube-scheduler kube-proxy "coredns-$COREDNS_VERSION"; do
    [ -x "$BIN/$tool" ] || die "$BIN/$tool is missing: run e2e/testenv/build-tools.sh (make testenv) first"
  done
  [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null)" = 1 ] ||
    die "bridged traffic does not pass netfilter (net.bridge.bridge-nf-call-iptables is not 1: load br_netfilter and set it), which pods need to reach each other through Services"
}

# The pid recorded for NAME, if that process is still the daemon it was (pids are reused).
daemon_pid() {
  local name=$1 dir=${2:-$ND} pid
  [ -f "$dir/$name.pid" ] || return 1
  pid=$(cat "$dir/$name.pid")
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name" && echo "$pid"
}

# Whether the node of DIR (its start, or any of its daemons or its control plane) still runs.
node_running() {
  local dir=$1 name
  [ -f "$dir/node/starting" ] && kill -0 "$(cat "$dir/node/starting")" 2>/dev/null && return 0
  for name in kubelet containerd kube-proxy kube-scheduler coredns; do daemon_pid "$name" "$dir/node" >/dev/null && return 0; done
  for name in kube-apiserver etcd; do daemon_pid "$name" "$dir" >/dev/null && return 0; done
  return 1
}

# Whether this DIR owns the machine's node: its bridge names DIR.
owns_bridge() {
  [ "$(ip -o link show "$BRIDGE" 2>/dev/null | sed -n 's/.* alias umw-test-node:\(.*\)$/\1/p')" = "$DIR" ]
}

# The node's subnet and the Service range must not overlap a network this machine is on.
check_networks() {
  ip -j route show table all | python3 -c '
import ipaddress, json, sys
mine = [ipaddress.ip_network(n) for n in sys.argv[1:]]
for route in json.load(sys.stdin):
    dst = route.get("dst", "default")
    if dst in ("default", "0.0.0.0/0") or ":" in dst or route.get("type") in ("local", "broadcast"):
        continue
    net = ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False)
    for m in mine:
        if net.overlaps(m):
            dev = route.get("dev", "?")
            sys.exit(f"{m} overlaps the route {dst} dev {dev} of this machine: set UMW_NODE_SUBNET (and UMW_NODE_IP)")
' "$SUBNET" "$SERVICE_CIDR" || die "the node's networks overlap this machine's"
}

# --- bridge: the node's network, made before the API server binds the node IP --------------------------

bridge() {
  preflight
  mkdir -p "$ND"
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    local owner
    owner=$(ip -o link show "$BRIDGE" | sed -n 's/.* alias umw-test-node:\(.*\)$/\1/p')
    [ -n "$owner" ] || die "the interface $BRIDGE exists and is not a test node's: set UMW_NODE_BRIDGE"
    if [ "$owner" != "$DIR" ] && node_running "$owner"; then
      die "a test node already runs on this machine (in $owner): stop it with e2e/testenv/up.sh --down $owner"
    fi
    log "removing the stale node of $owner"
    if [ -d "$owner/node" ]; then
      DIR=$owner ND=$owner/node stop_node
    else
      log "warning: $owner/node is gone: its record of the host's settings with it; removing its network only"
      nft delete table inet umw-test-node 2>/dev/null || true
      nft delete table ip kube-proxy 2>/dev/null || true
      nft delete table ip6 kube-proxy 2>/dev/null || true
      ip link del "$BRIDGE" 2>/dev/null || true
    fi
  elif nft list table ip kube-proxy >/dev/null 2>&1; then
    die "this machine already has kube-proxy's nftables table (ip kube-proxy): another kube-proxy runs here"
  fi
  check_networks
  echo "$PPID" > "$ND/starting"
  # What the host looked like before, to be put back by `stop`.
  : > "$ND/sysctl.before"
  local key
  for key in "${SYSCTLS[@]}"; do
    if [ -e "/proc/sys/${key//.//}" ]; then echo "$key=$(sysctl -n "$key")" >> "$ND/sysctl.before"; fi
  done
  : > "$ND/paths.before"
  for key in "${HOST_PATHS[@]}"; do
    if [ -e "$key" ]; then echo "$key" >> "$ND/paths.before"; fi
  done
  [ -d /sys/fs/cgroup/memory/kubepods ] || [ -d /sys/fs/cgroup/kubepods ] && touch "$ND/cgroups.before"
  { nft list tables; ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//'; } | sort > "$ND/host.before"

  ip link add "$BRIDGE" type bridge
  ip link set "$BRIDGE" alias "umw-test-node:$DIR"
  ip addr add "$NODE_IP/${SUBNET#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # ClusterIPs that kube-proxy does not translate go nowhere rather than out of the machine.
  ip route add "$SERVICE_CIDR" dev "$BRIDGE" src "$NODE_IP"
  # Pods reach each other through ClusterIPs (the host forwards between bridge ports). Nothing else is
  # forwarded, not to or from any other interface, and the servers on the node IP answer the bridge
  # and this machine only.
  sysctl -qw "net.ipv4.conf.$BRIDGE.forwarding=1"
  nft -f - <<NFT
table inet umw-test-node {
  chain forward {
    type filter hook forward priority 0; policy accept;
    iifname "$BRIDGE" oifname != "$BRIDGE" drop
    oifname "$BRIDGE" iifname != "$BRIDGE" drop
  }
  chain input {
    type filter hook input priority 0; policy accept;
    ip daddr $NODE_IP iifname != { "$BRIDGE", "lo" } drop
  }
}
NFT
  log "bridge $BRIDGE up: node IP $NODE_IP, pods in $SUBNET"
}

# --- start ------------------------------------------------------------------------------------------

certs() {
  local pki=$ND/pki cp=$DIR/pki
  mkdir -p "$pki"
  openssl req -newkey rsa:2048 -nodes -keyout "$pki/kubelet-client.key" -out "$pki/kubelet-client.csr" \
    -subj "/O=system:nodes/CN=system:node:$NODE_NAME" 2>/dev/null
  echo "extendedKeyUsage=clientAuth" > "$pki/client.ext"
  openssl x509 -req -in "$pki/kubelet-client.csr" -CA "$cp/ca.crt" -CAkey "$cp/ca.key" -CAcreateserial \
    -out "$pki/kubelet-client.crt" -days 30 -extfile "$pki/client.ext" 2>/dev/null
  printf 'subjectAltName=DNS:%s,IP:127.0.0.1,IP:%s\nextendedKeyUsage=serverAuth\n' "$NODE_NAME" "$NODE_IP" > "$pki/serving.ext"
  openssl req -newkey rsa:2048 -nodes -keyout "$pki/kubelet.key" -out "$pki/kubelet.csr" -subj "/CN=$NODE_NAME" 2>/dev/null
  openssl x509 -req -in "$pki/kubelet.csr" -CA "$cp/ca.crt" -CAkey "$cp/ca.key" -CAcreateserial \
    -out "$pki/kubelet.crt" -days 30 -extfile "$pki/serving.ext" 2>/dev/null
  local server
  server=$(sed -n 's/^ *server: *//p' "$DIR/kubeconfig" | head -1)
  cat > "$ND/kubelet.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: umw-test
  cluster: {server: "$server", certificate-authority: "$cp/ca.crt"}
users:
- name: kubelet
  user: {client-certificate: "$pki/kubelet-client.crt", client-key: "$pki/kubelet-client.key"}
contexts:
- name: umw-test
  context: {cluster: umw-test, user: kubelet}
current-context: umw-test
KC
  # The test control plane authorizes with RBAC only (no Node authorizer): nodes get the system:node role.
  kubectl_ create clusterrolebinding umw-test-nodes --clusterrole=system:node --group=system:nodes \
    --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null
}

start_containerd() {
  local c=$ND/containerd
  mkdir -p "$c/root" "$c/state" "$c/opt" "$ND/cni/net.d" "$ND/cni/ipam" "$ND/runc" "$ND/registries/_default"
  # isGateway false: the bridge has its address already, and the plugin would otherwise switch on
  # forwarding for the whole machine (net.ipv4.ip_forward); the bridge's own forwarding is enough.
  cat > "$ND/cni/net.d/10-umw.conflist" <<CNI
{"cniVersion": "0.4.0", "name": "umw-pods", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": false, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$SUBNET", "gateway": "$NODE_IP"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$ND/cni/ipam"}}]}
CNI
  # Images are imported, never pulled; a pull that is attempted anyway goes to a closed loopback port.
  for registry in _default docker.io ghcr.io gcr.io registry.k8s.io quay.io localhost; do
    mkdir -p "$ND/registries/$registry"
    printf 'server = "http://127.0.0.1:9"\n' > "$ND/registries/$registry/hosts.toml"
  done
  cat > "$c/config.toml" <<TOML
version = 2
root = "$c/root"
state = "$c/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$c/containerd.sock"
[ttrpc]
  address = "$c/containerd.sock.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$c/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/umw-pause:$PAUSE_VERSION"
  # Without CAP_SYS_RESOURCE a negative oom_score_adj (kubelet asks -997 for Guaranteed pods) is refused.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$ND/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$ND/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$ND/registries"
TOML
  daemon containerd containerd --config "$c/config.toml"
  wait_for 100 ctr_ version || fail_with_log containerd "containerd did not start"
  # The project's images and the pause image, from the images built by images.sh.
  bash "$HERE/images.sh" archive "$ND/images"
  local archive
  for archive in "$ND"/images/*.tar; do
    ctr_ images import "$archive" >/dev/null || die "importing $archive into containerd failed"
  done
  rm -rf "$ND/images"
}

start_kubelet() {
  local port
  reserve_port port
  mkdir -p "$ND/kubelet" "$ND/pod-logs" "$ND/volume-plugins"
  cat > "$ND/kubelet-config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine: cgroup v1 (hybrid), no systemd, and containerd 1.6, which cannot report its cgroup driver.
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$ND/containerd/containerd.sock
address: 127.0.0.1
port: $port
readOnlyPort: 0
healthzPort: 0
# The API server dials the node by its name (localhost) with a client certificate of the test CA (logs,
# exec); nothing else is let in.
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $DIR/pki/ca.crt}
authorization: {mode: AlwaysAllow}
serverTLSBootstrap: false
rotateCertificates: false
tlsCertFile: $ND/pki/kubelet.crt
tlsPrivateKeyFile: $ND/pki/kubelet.key
podLogsDir: $ND/pod-logs
volumePluginDir: $ND/volume-plugins
# Leave the host's iptables alone; kube-proxy keeps its rules in nftables tables of its own.
makeIPTablesUtilChains: false
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
# Pods resolve cluster names only: no search path or nameserver of the host's.
resolvConf: ""
# ConfigMap and Secret updates reach the pods within about 10 s (the default 1m makes them take ~70 s).
syncFrequency: 10s
failSwapOn: true
# The pods of a test are small; do not evict them because the shared disk is fuller than a node's would be.
evictionHard: {memory.available: "100Mi", nodefs.available: "2%", imagefs.available: "2%"}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
YAML
  daemon kubelet "$BIN/kubelet" --config "$ND/kubelet-config.yaml" --kubeconfig "$ND/kubelet.kubeconfig" \
    --root-dir "$ND/kubelet" --cert-dir "$ND/kubelet/pki" --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v=1
  wait_for 600 kubectl_ get node "$NODE_NAME" || fail_with_log kubelet "the kubelet did not register its node"
  kubectl_ wait --for=condition=Ready "node/$NODE_NAME" --timeout=60s >/dev/null ||
    fail_with_log kubelet "the node did not become Ready"
  # The not-ready taint is added at registration and removed by the node lifecycle controller, which the
  # test control plane does not run.
  kubectl_ taint node "$NODE_NAME" node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
}

start_services() {
  local scheduler_port healthz_port metrics_port
  reserve_port scheduler_port; reserve_port healthz_port; reserve_port metrics_port
  daemon kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$DIR/kubeconfig" --leader-elect=false \
    --authentication-kubeconfig "$DIR/kubeconfig" --authorization-kubeconfig "$DIR/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$scheduler_port" --v=1
  cat > "$ND/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: $DIR/kubeconfig}
hostnameOverride: $NODE_NAME
clusterCIDR: $SUBNET
nodePortAddresses: [$NODE_IP/32]
healthzBindAddress: 127.0.0.1:$healthz_port
metricsBindAddress: 127.0.0.1:$metrics_port
# Leave the host's connection-tracking settings alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  daemon kube-proxy "$BIN/kube-proxy" --config "$ND/kube-proxy.yaml" --v=1
  cat > "$ND/Corefile" <<COREFILE
.:53 {
    bind $NODE_IP
    errors
    cache 5
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $DIR/kubeconfig
        pods insecure
        ttl 5
    }
}
COREFILE
  daemon coredns "$BIN/coredns-$COREDNS_VERSION" -conf "$ND/Corefile"
  wait_for 100 nft list table ip kube-proxy || fail_with_log kube-proxy "kube-proxy made no nftables table"
  alive kube-scheduler || fail_with_log kube-scheduler "kube-scheduler exited"
  alive coredns || fail_with_log coredns "CoreDNS exited"
}

start() {
  preflight
  [ -f "$DIR/kubeconfig" ] || die "no control plane in $DIR: start it first (up.sh DIR --node)"
  ip link show "$BRIDGE" >/dev/null 2>&1 || die "no bridge $BRIDGE: run node.sh bridge $DIR before the control plane"
  local t0=$SECONDS
  certs
  start_containerd
  start_kubelet
  start_services
  cat >> "$DIR/env" <<ENV
export UMW_NODE_IP=$NODE_IP
export UMW_NODE_SUBNET=$SUBNET
export UMW_NODE_CONTAINERD=$ND/containerd/containerd.sock
ENV
  rm -f "$ND/starting"
  log "node $NODE_NAME Ready in $((SECONDS - t0))s (kubelet, containerd, kube-proxy, CoreDNS, kube-scheduler)"
}

# --- stop -------------------------------------------------------------------------------------------

# Stops the named daemons together: SIGTERM, then SIGKILL for those still there after 5 s. Only pids
# that are still the daemons they were are signalled.
stop_daemons() {
  local name pid pids=() waiting
  for name in "$@"; do
    pid=$(daemon_pid "$name") && pids+=("$pid")
    rm -f "$ND/$name.pid"
  done
  [ ${#pids[@]} -eq 0 ] && return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 50); do
    waiting=""
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then waiting=1; fi
    done
    [ -z "$waiting" ] && break
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

# The cgroups the kubelet made (kubepods, in every cgroup v1 hierarchy, or in the cgroup v2 tree).
kubepods_cgroups() {
  local dir
  for dir in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    if [ -d "$dir" ]; then echo "$dir"; fi
  done
}

stop_node() {
  # The kubelet first, so that it restarts nothing; then every container, as the kubelet would have.
  stop_daemons kubelet kube-scheduler kube-proxy coredns
  local id running
  if [ -S "$ND/containerd/containerd.sock" ] && daemon_pid containerd >/dev/null; then
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    for _ in $(seq 1 50); do
      running=$(ctr_ tasks ls 2>/dev/null || true)
      grep -q RUNNING <<< "$running" || break
      sleep 0.1
    done
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$id" >/dev/null 2>&1 || true; done
  fi
  stop_daemons containerd
  # Shims outlive containerd; they were started for this node's socket.
  pkill -9 -f "containerd-shim-runc-v2 .*-address $ND/containerd/containerd.sock" 2>/dev/null || true
  local owner=""
  if ! ip link show "$BRIDGE" >/dev/null 2>&1 || owns_bridge; then owner=1; fi
  # Whatever still runs in the pods' cgroups (containerd died before it could stop them).
  if [ -n "$owner" ]; then
    local procs
    procs=$(kubepods_cgroups | while read -r dir; do find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null; done | sort -u)
    [ -z "$procs" ] || kill -9 $procs 2>/dev/null || true
  fi
  # Mounts under the node's directory (pod volumes, container root filesystems, network namespaces,
  # the kubelet's own bind mount), deepest first.
  local mount_point
  awk -v dir="$ND/" 'index($2, dir) == 1 { print $2 }' /proc/self/mounts | sort -r | while IFS= read -r mount_point; do
    umount "$mount_point" 2>/dev/null || umount -l "$mount_point" 2>/dev/null || true
  done
  # Pod addresses are released with the node (the kubelet did not tear the pods down one by one).
  rm -rf "$ND/cni/ipam"
  rm -f "$ND/starting"
  if [ -z "$owner" ]; then
    log "the node on this machine is not the one of $DIR: the host's network and settings are left alone"
    return 0
  fi
  # Network: the pods' veths went with their namespaces.
  nft delete table inet umw-test-node 2>/dev/null || true
  nft delete table ip kube-proxy 2>/dev/null || true
  nft delete table ip6 kube-proxy 2>/dev/null || true
  ip link del "$BRIDGE" 2>/dev/null || true
  # Cgroups the kubelet made (the pods' own went with their containers), deepest first.
  if [ ! -f "$ND/cgroups.before" ]; then
    kubepods_cgroups | while read -r dir; do find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null || true; done
  fi
  # The kernel settings, as they were, in the order recorded.
  if [ -f "$ND/sysctl.before" ]; then
    local line key value
    while IFS= read -r line; do
      key=${line%%=*}; value=${line#*=}
      [ "$(sysctl -n "$key" 2>/dev/null)" = "$value" ] || sysctl -qw "$key=$value" 2>/dev/null ||
        log "warning: could not restore $key to $value"
    done < "$ND/sysctl.before"
  fi
  if [ -f "$ND/paths.before" ]; then
    local path
    for path in "${HOST_PATHS[@]}"; do
      grep -qxF "$path" "$ND/paths.before" && continue
      # Never into a mount.
      if awk -v p="$path" '$2 == p || index($2, p "/") == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
        log "warning: $path has mounts beneath it; left in place"
      else
        rm -rf --one-file-system "$path" || true
      fi
    done
  fi
  # Anything else of the host's that changed while the node ran (a table or an interface left behind).
  if [ -f "$ND/host.before" ]; then
    local changed
    changed=$({ nft list tables; ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//'; } | sort | comm -13 "$ND/host.before" - || true)
    [ -z "$changed" ] || log "warning: left on the host since the node started: $(echo "$changed" | tr '\n' ' ')"
  fi
}

usage() { die "usage: $0 bridge|start|stop DIR"; }
[ $# -ge 2 ] || usage
DIR=$(mkdir -p "$2" && cd "$2" && pwd)
ND="$DIR/node"
case "$1" in
  bridge) bridge ;;
  start) start ;;
  stop) [ -d "$ND" ] && stop_node; log "node of $DIR stopped" ;;
  *) usage ;;
esac
