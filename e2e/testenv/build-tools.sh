#!/usr/bin/env bash
# Builds, once, the real Kubernetes control-plane and node binaries and the tools the tests use, from the Go module
# proxy, and caches them by version under ${UMW_TESTENV_CACHE}. Idempotent: a warm cache returns at once.
#
#   e2e/testenv/build-tools.sh            # build whatever is missing
#   e2e/testenv/build-tools.sh --print    # print the bin directory
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"

command -v go >/dev/null || { echo "[build-tools] error: Go is needed to build the test tools (install golang)" >&2; exit 1; }
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
mkdir -p "$UMW_TESTENV_BIN"
log() { printf '[build-tools] %s\n' "$*" >&2; }

have() { [ -x "$UMW_TESTENV_BIN/$1" ]; }

# A throwaway module per tool, so that no go.mod of ours pins anything.
scratch() {
  local dir="$UMW_TESTENV_CACHE/build/$1"
  rm -rf "$dir"; mkdir -p "$dir"; echo "$dir"
}

build_kubernetes() {
  if have kube-apiserver && have kube-controller-manager && have kubectl; then return; fi
  log "building Kubernetes v$K8S_VERSION (kube-apiserver, kube-controller-manager, kubectl); first time takes about 7 minutes on 2 cores"
  local t0=$SECONDS dir gomod goversion stg minor
  dir=$(scratch "kubernetes-$K8S_VERSION")
  cd "$dir"
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  goversion=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod" | head -1)
  printf 'module local/k8sbuild\n\ngo %s\n' "$goversion" > go.mod
  # Kubernetes replaces its staging modules (k8s.io/api, ...) with local paths; point them at the tags.
  stg="v0.${K8S_VERSION#1.}"
  for m in $(sed -n 's|^\t\(k8s.io/[a-z0-9-]*\) => ./staging/.*|\1|p' "$gomod"); do
    go mod edit -replace="$m=$m@$stg"
  done
  local p=k8s.io/kubernetes/cmd
  go get "$p/kube-apiserver@v$K8S_VERSION" "$p/kube-controller-manager@v$K8S_VERSION" "$p/kubectl@v$K8S_VERSION"
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  local v="-X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  v="$v -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  go build -p 2 -trimpath -ldflags "-s -w $v" -o "$UMW_TESTENV_BIN/" "$p/kube-apiserver" "$p/kube-controller-manager" "$p/kubectl"
  log "Kubernetes v$K8S_VERSION built in $((SECONDS - t0))s"
}

build_etcd() {
  if have etcd; then return; fi
  log "building etcd v$ETCD_VERSION"
  local t0=$SECONDS dir
  dir=$(scratch "etcd-$ETCD_VERSION")
  cd "$dir"
  printf 'module local/etcdbuild\n\ngo 1.24\n' > go.mod
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
  go build -p 2 -trimpath -ldflags "-s -w" -o "$UMW_TESTENV_BIN/etcd" go.etcd.io/etcd/server/v3
  log "etcd v$ETCD_VERSION built in $((SECONDS - t0))s"
}

build_helm() {
  if have helm; then return; fi
  log "building helm v$HELM_VERSION"
  local t0=$SECONDS dir
  dir=$(scratch "helm-$HELM_VERSION")
  cd "$dir"
  printf 'module local/helmbuild\n\ngo 1.24\n' > go.mod
  go get "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
  go build -p 2 -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION" \
    -o "$UMW_TESTENV_BIN/helm" helm.sh/helm/v3/cmd/helm
  log "helm v$HELM_VERSION built in $((SECONDS - t0))s"
}

# The real node (e2e/testenv/node.sh): kubelet, kube-scheduler and kube-proxy, from the same module and
# with the same flags as the control plane, so that the Go build cache it left makes this quick.
build_node() {
  if have kubelet && have kube-scheduler && have kube-proxy; then return; fi
  log "building kubelet, kube-scheduler and kube-proxy v$K8S_VERSION"
  local t0=$SECONDS dir minor p=k8s.io/kubernetes/cmd
  dir="$UMW_TESTENV_CACHE/build/kubernetes-$K8S_VERSION"
  [ -f "$dir/go.mod" ] || { rm -f "$UMW_TESTENV_BIN/kube-apiserver"; build_kubernetes; }
  cd "$dir"
  go get "$p/kubelet@v$K8S_VERSION" "$p/kube-scheduler@v$K8S_VERSION" "$p/kube-proxy@v$K8S_VERSION"
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  local v="-X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  v="$v -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  go build -p 2 -trimpath -ldflags "-s -w $v" -o "$UMW_TESTENV_BIN/" "$p/kubelet" "$p/kube-scheduler" "$p/kube-proxy"
  log "kubelet, kube-scheduler and kube-proxy v$K8S_VERSION built in $((SECONDS - t0))s"
}

# The real node's cluster DNS: CoreDNS with only the plugins it uses (a main of our own, as CoreDNS
# documents for custom builds), so that the cloud providers' SDKs are not compiled.
build_coredns() {
  if have "coredns-$COREDNS_VERSION"; then return; fi
  log "building CoreDNS v$COREDNS_VERSION"
  local t0=$SECONDS dir
  dir=$(scratch "coredns-$COREDNS_VERSION")
  cd "$dir"
  printf 'module local/corednsbuild\n\ngo 1.25.0\n' > go.mod
  cat > main.go <<'GO'
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
)

// The plugins, in CoreDNS's own order (core/dnsserver/zdirectives.go).
func init() { dnsserver.Directives = []string{"bind", "errors", "log", "cache", "kubernetes"} }

func main() { coremain.Run() }
GO
  go get "github.com/coredns/coredns@v$COREDNS_VERSION"
  go mod tidy
  go build -p 2 -trimpath -ldflags "-s -w" -o "$UMW_TESTENV_BIN/coredns-$COREDNS_VERSION" .
  log "CoreDNS v$COREDNS_VERSION built in $((SECONDS - t0))s"
}

# kstatus, the library Flux and kpt read resource health with: a small main of our own around
# sigs.k8s.io/cli-utils/pkg/kstatus/status (e2e/testenv/kstatus/main.go).
build_kstatus() {
  if have umw-kstatus && [ "$(cat "$UMW_TESTENV_BIN/umw-kstatus.version" 2>/dev/null)" = "$KSTATUS_VERSION" ]; then return; fi
  log "building kstatus (sigs.k8s.io/cli-utils v$KSTATUS_VERSION)"
  local t0=$SECONDS dir
  dir=$(scratch "kstatus-$KSTATUS_VERSION")
  cp "$HERE/kstatus/main.go" "$dir/"
  cd "$dir"
  printf 'module local/kstatus\n\ngo 1.24\n' > go.mod
  go get "sigs.k8s.io/cli-utils@v$KSTATUS_VERSION"
  go mod tidy
  go build -p 2 -trimpath -ldflags "-s -w" -o "$UMW_TESTENV_BIN/umw-kstatus" .
  echo "$KSTATUS_VERSION" > "$UMW_TESTENV_BIN/umw-kstatus.version"
  log "kstatus built in $((SECONDS - t0))s"
}

case "${1:-}" in
  --print) echo "$UMW_TESTENV_BIN"; exit 0 ;;
esac

build_etcd
build_kubernetes
build_helm
build_node
build_coredns
build_kstatus
log "tools ready in $UMW_TESTENV_BIN"
