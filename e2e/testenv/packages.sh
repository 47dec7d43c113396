#!/usr/bin/env bash
# Installs the Debian packages the tests run for real, when they are missing: redis-server and openssl (the
# cache's integration tests start private instances of it), Java and Maven (the Kafka broker of the event
# tests), PostgreSQL (commands and the outbox; the tests start private clusters with initdb), Node.js and
# npm (the auth tests' OpenID provider), and what builds and runs the images on a real node (buildah,
# debootstrap, containerd, runc, the CNI plugins). Run as root (or with passwordless sudo); otherwise it
# names the command to run and fails.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v openssl >/dev/null || missing+=(openssl)
# The scripts pick free ports and check networks with python3.
command -v python3 >/dev/null || missing+=(python3)
# Apache Kafka for the event tests runs on Java 17 and comes from Maven Central through Maven.
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
# PostgreSQL server binaries live under /usr/lib/postgresql/<version>/bin; psql is the client.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v psql >/dev/null || missing+=(postgresql-client)
# The auth tests' OpenID provider (oidc-provider from npm, e2e/testenv/idp.sh) runs on Node.js.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
# The images and the real node (images.sh, node.sh): buildah and debootstrap build the images, containerd
# and runc run them, the CNI plugins give pods their network, nftables holds kube-proxy's rules.
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v readelf >/dev/null || missing+=(binutils)
command -v containerd >/dev/null || missing+=(containerd)
command -v runc >/dev/null || missing+=(runc)
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
command -v nft >/dev/null || missing+=(nftables)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "[packages] installing ${missing[*]} from Debian" >&2
if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "[packages] error: run: sudo apt-get install -y ${missing[*]}" >&2; exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q "${missing[@]}" >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${missing[@]}" >/dev/null; }
# The Debian package starts a system-wide instance; the tests start their own.
$SUDO systemctl disable --now redis-server >/dev/null 2>&1 || $SUDO service redis-server stop >/dev/null 2>&1 || true
$SUDO systemctl disable --now postgresql >/dev/null 2>&1 || $SUDO service postgresql stop >/dev/null 2>&1 || true
