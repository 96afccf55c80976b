#!/usr/bin/env bash
# Installs or builds every external tool the tests and the local stack need, at pinned
# versions, cached under $KVCSI_CACHE. A warm run only checks the cache and takes seconds.
#
# Usage: hack/tools.sh [all|k8s|sanity|debs]   (default: all)
# Prints "export VAR=path" lines for the built tools on stdout when called with --env.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

K8S_BIN="$KVCSI_CACHE/bin/k8s-$K8S_VERSION"
SANITY_BIN="$KVCSI_CACHE/bin/csi-sanity-$CSI_SANITY_VERSION"

debs() {
  # etcd for the apiservers, qemu for the worker VM, filesystem tools the node plugin calls,
  # openssl for test certificates, cpio/busybox for the guest initramfs.
  apt_ensure etcd-server qemu-system-x86 qemu-utils e2fsprogs xfsprogs util-linux \
    openssl cpio busybox-static kmod bc
  local v
  v=$(dpkg-query -W -f='${Version}' etcd-server)
  case "$v" in "$ETCD_DEB_VERSION_PREFIX"*) ;; *) die "etcd-server $v is not 3.4.x; kube-apiserver $K8S_VERSION was validated with 3.4.23";; esac
}

# The kubernetes module cannot be `go install`ed (it has replace directives for its staging
# modules), so we build it from a wrapper module that requires it and replaces every staging
# module with its published v0.N.P release.
k8s() {
  if [ -x "$K8S_BIN/kube-apiserver" ] && [ -x "$K8S_BIN/kube-controller-manager" ] && [ -x "$K8S_BIN/kubectl" ]; then
    log "kubernetes $K8S_VERSION binaries cached in $K8S_BIN"
    return 0
  fi
  local src="$KVCSI_CACHE/src/k8s-wrapper-$K8S_VERSION"
  local staging_version="v0.${K8S_VERSION#v1.}"
  mkdir -p "$src" "$K8S_BIN"
  local gomod
  gomod=$(cd "$src" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module kvcsi.local/k8s-wrapper"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    # every "k8s.io/x => ./staging/src/k8s.io/x" replace becomes "k8s.io/x => k8s.io/x v0.N.P"
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } > "$src/go.mod"
  cat > "$src/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  (cd "$src" && GOFLAGS=-mod=mod go mod tidy >&2) || die "go mod tidy for the kubernetes wrapper failed"
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
  local cmd
  for cmd in kube-apiserver kube-controller-manager kubectl; do
    [ -x "$K8S_BIN/$cmd" ] && continue
    log "building $cmd $K8S_VERSION (cold builds take 10-25 minutes on 2 cores)"
    (cd "$src" && GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$K8S_BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd") \
      || die "building $cmd failed"
    mv "$K8S_BIN/$cmd.tmp" "$K8S_BIN/$cmd"
  done
}

sanity() {
  if [ -x "$SANITY_BIN/csi-sanity" ]; then
    log "csi-sanity $CSI_SANITY_VERSION cached"
    return 0
  fi
  mkdir -p "$SANITY_BIN"
  GOBIN="$SANITY_BIN" go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION" \
    || die "go install csi-sanity failed"
}

print_env() {
  echo "export KVCSI_CACHE='$KVCSI_CACHE'"
  echo "export KUBE_APISERVER='$K8S_BIN/kube-apiserver'"
  echo "export KUBE_CONTROLLER_MANAGER='$K8S_BIN/kube-controller-manager'"
  echo "export KUBECTL='$K8S_BIN/kubectl'"
  echo "export ETCD='$(command -v etcd || echo /usr/bin/etcd)'"
  echo "export CSI_SANITY='$SANITY_BIN/csi-sanity'"
}

what=${1:-all}
case "$what" in
  debs) stage debs debs ;;
  k8s) stage "kubernetes $K8S_VERSION" k8s ;;
  sanity) stage "csi-sanity $CSI_SANITY_VERSION" sanity ;;
  all) stage debs debs; stage "kubernetes $K8S_VERSION" k8s; stage "csi-sanity $CSI_SANITY_VERSION" sanity ;;
  --env) print_env ;;
  *) die "unknown target '$what' (all|k8s|sanity|debs|--env)" ;;
esac
