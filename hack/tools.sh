#!/usr/bin/env bash
# Installs or builds every external tool the tests and the local stack need, at pinned
# versions, cached under $KVCSI_CACHE. A warm run only checks the cache and takes seconds.
#
# Usage: hack/tools.sh [all|k8s|sanity|sidecars|kubevirt|debs]   (default: all)
# Prints "export VAR=path" lines for the built tools on stdout when called with --env.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

K8S_BIN="$KVCSI_CACHE/bin/k8s-$K8S_VERSION"
SANITY_BIN="$KVCSI_CACHE/bin/csi-sanity-$CSI_SANITY_VERSION"
KUBEVIRT_BIN="$KVCSI_CACHE/bin/kubevirt-$KUBEVIRT_VERSION"

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

# The CSI sidecars the end-to-end tests run against the plugins: NAME MODULE VERSION, one a
# line. Each builds to $KVCSI_CACHE/bin/NAME-VERSION/NAME.
sidecar_list() {
  cat <<EOF
csi-provisioner github.com/kubernetes-csi/external-provisioner/v6 $CSI_PROVISIONER_VERSION
csi-attacher github.com/kubernetes-csi/external-attacher/v4 $CSI_ATTACHER_VERSION
csi-resizer github.com/kubernetes-csi/external-resizer/v2 $CSI_RESIZER_VERSION
csi-snapshotter github.com/kubernetes-csi/external-snapshotter/v8 $CSI_SNAPSHOTTER_VERSION
snapshot-controller github.com/kubernetes-csi/external-snapshotter/v8 $CSI_SNAPSHOTTER_VERSION
EOF
}

sidecar_bin() { echo "$KVCSI_CACHE/bin/$1-$2/$1"; }

# build_sidecar NAME MODULE VERSION: `go install MODULE/cmd/NAME@VERSION` when the module's
# go.mod has no replace directives (go install refuses those). Otherwise a wrapper module
# requires MODULE@VERSION and repeats its replaces, so the build resolves exactly the
# dependency versions upstream released with; a replace onto a directory inside the
# repository (external-snapshotter's ./client) becomes that sub-module's published release of
# the same version.
build_sidecar() {
  local name=$1 module=$2 version=$3
  local out; out=$(sidecar_bin "$name" "$version")
  if [ -x "$out" ]; then
    log "$name $version cached in $(dirname "$out")"
    return 0
  fi
  local dir; dir=$(dirname "$out")
  local src="$KVCSI_CACHE/src/sidecar-$name-$version"
  local ldflags="-s -w -X main.version=$version"
  mkdir -p "$src"
  local gomod
  gomod=$(cd "$src" && GOFLAGS=-mod=mod go mod download -json "$module@$version" \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("GoMod") or sys.exit(d.get("Error", "no go.mod")))') \
    || die "cannot download $module@$version from the module proxy"
  mkdir -p "$dir"
  local replaces
  replaces=$(go mod edit -json "$gomod" | python3 -c '
import json, sys
mod = json.load(sys.stdin)
for r in mod.get("Replace") or []:
    old, new = r["Old"], r["New"]
    lhs = old["Path"] + (" " + old["Version"] if old.get("Version") else "")
    if new.get("Version"):
        print("replace %s => %s %s" % (lhs, new["Path"], new["Version"]))
    else:
        # a directory in the same repository: its published release of the same tag
        print("replace %s => %s %s" % (lhs, old["Path"], sys.argv[1]))
' "$version")
  if [ -z "$replaces" ]; then
    log "building $name $version with go install"
    GOBIN="$dir" GOFLAGS=-mod=mod go install -trimpath -ldflags "$ldflags" "$module/cmd/$name@$version" \
      || die "go install $module/cmd/$name@$version failed"
    return 0
  fi
  local godirective
  godirective=$(go mod edit -json "$gomod" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("Go") or "1.24")')
  {
    echo "module kvcsi.local/sidecar-wrapper/$name"
    echo
    echo "go $godirective"
    echo
    echo "require $module $version"
    echo
    echo "$replaces"
  } > "$src/go.mod"
  cat > "$src/tools.go" <<GO
//go:build tools

package tools

import _ "$module/cmd/$name"
GO
  (cd "$src" && GOFLAGS=-mod=mod go mod tidy >&2) || die "go mod tidy for the $name wrapper failed"
  log "building $name $version from a wrapper module (upstream go.mod has replace directives)"
  (cd "$src" && GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$out.tmp" "$module/cmd/$name") \
    || die "building $name $version failed"
  mv "$out.tmp" "$out"
}

sidecars() {
  local name module version
  while read -r name module version; do
    stage "$name $version" build_sidecar "$name" "$module" "$version"
  done < <(sidecar_list)
  log "node-driver-registrar $CSI_NODE_DRIVER_REGISTRAR_VERSION and livenessprobe $CSI_LIVENESSPROBE_VERSION are image-only pins (see hack/lib.sh); not built"
}

# KubeVirt's virt-api and virt-controller, and the objects virt-operator would install
# (CRDs, RBAC, webhooks, APIServices), printed by hack/kubevirt-manifests. Like kubernetes,
# kubevirt.io/kubevirt has replace directives (its staging modules and pins of k8s.io/* and
# openshift), so a wrapper module requires it together with the published kubevirt.io/api
# and kubevirt.io/client-go releases and repeats every replace except the ./staging ones.
kubevirt_wrapper() {
  local src=$1
  local gomod
  gomod=$(cd "$src" && GOFLAGS=-mod=mod go mod download -json "kubevirt.io/kubevirt@$KUBEVIRT_VERSION" \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("GoMod") or sys.exit(d.get("Error", "no go.mod")))') \
    || die "cannot download kubevirt.io/kubevirt@$KUBEVIRT_VERSION from the module proxy"
  local replaces
  replaces=$(go mod edit -json "$gomod" | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Replace") or []:
    old, new = r["Old"], r["New"]
    if not new.get("Version"):
        continue  # ./staging/src/kubevirt.io/{api,client-go}: required at the same version instead
    lhs = old["Path"] + (" " + old["Version"] if old.get("Version") else "")
    print("replace %s => %s %s" % (lhs, new["Path"], new["Version"]))
')
  [ -n "$replaces" ] || die "kubevirt.io/kubevirt@$KUBEVIRT_VERSION has no replace block; check the wrapper logic"
  {
    echo "module kvcsi.local/kubevirt-wrapper"
    echo
    echo "go 1.24.0"
    echo
    echo "require ("
    echo "	kubevirt.io/kubevirt $KUBEVIRT_VERSION"
    echo "	kubevirt.io/api $KUBEVIRT_VERSION"
    echo "	kubevirt.io/client-go $KUBEVIRT_VERSION"
    echo ")"
    echo
    echo "tool ("
    echo "	kubevirt.io/kubevirt/cmd/virt-api"
    echo "	kubevirt.io/kubevirt/cmd/virt-controller"
    echo ")"
    echo
    echo "$replaces"
  } > "$src/go.mod"
  mkdir -p "$src/cmd/kubevirt-manifests"
  cp "$KVCSI_ROOT/hack/kubevirt-manifests/main.go" "$src/cmd/kubevirt-manifests/main.go"
  (cd "$src" && GOFLAGS=-mod=mod heartbeat go mod tidy >&2) || die "go mod tidy for the kubevirt wrapper failed"
}

kubevirt_build() {
  local src=$1
  local ldflags="-s -w -X kubevirt.io/client-go/version.gitVersion=$KUBEVIRT_VERSION"
  local tmp="$KUBEVIRT_BIN/.tmp"
  rm -rf "$tmp"; mkdir -p "$tmp"
  log "building virt-api, virt-controller $KUBEVIRT_VERSION and kubevirt-manifests (cold: ~4 minutes on 2 cores)"
  (cd "$src" && GOFLAGS=-mod=mod heartbeat go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
    kubevirt.io/kubevirt/cmd/virt-api kubevirt.io/kubevirt/cmd/virt-controller ./cmd/kubevirt-manifests) \
    || die "building KubeVirt $KUBEVIRT_VERSION failed"
  mv "$tmp/virt-api" "$tmp/virt-controller" "$tmp/kubevirt-manifests" "$KUBEVIRT_BIN/"
  rmdir "$tmp"
}

kubevirt_manifests() {
  local out="$KUBEVIRT_BIN/manifests"
  rm -rf "$out.tmp"
  "$KUBEVIRT_BIN/kubevirt-manifests" "$out.tmp" || die "kubevirt-manifests failed"
  rm -rf "$out"; mv "$out.tmp" "$out"
  sha256sum "$KVCSI_ROOT/hack/kubevirt-manifests/main.go" | cut -d' ' -f1 > "$out/.source-sha256"
}

kubevirt() {
  local want_sha; want_sha=$(sha256sum "$KVCSI_ROOT/hack/kubevirt-manifests/main.go" | cut -d' ' -f1)
  local have_sha; have_sha=$(cat "$KUBEVIRT_BIN/manifests/.source-sha256" 2>/dev/null || true)
  if [ -x "$KUBEVIRT_BIN/virt-api" ] && [ -x "$KUBEVIRT_BIN/virt-controller" ] \
    && [ -x "$KUBEVIRT_BIN/kubevirt-manifests" ] && [ "$want_sha" = "$have_sha" ]; then
    log "KubeVirt $KUBEVIRT_VERSION binaries and manifests cached in $KUBEVIRT_BIN"
    return 0
  fi
  local src="$KVCSI_CACHE/src/kubevirt-wrapper-$KUBEVIRT_VERSION"
  mkdir -p "$src" "$KUBEVIRT_BIN"
  stage "kubevirt $KUBEVIRT_VERSION wrapper module (go mod tidy)" kubevirt_wrapper "$src"
  stage "kubevirt $KUBEVIRT_VERSION go build" kubevirt_build "$src"
  stage "kubevirt $KUBEVIRT_VERSION manifests" kubevirt_manifests
}

print_env() {
  echo "export KVCSI_CACHE='$KVCSI_CACHE'"
  echo "export KUBE_APISERVER='$K8S_BIN/kube-apiserver'"
  echo "export KUBE_CONTROLLER_MANAGER='$K8S_BIN/kube-controller-manager'"
  echo "export KUBECTL='$K8S_BIN/kubectl'"
  echo "export ETCD='$(command -v etcd || echo /usr/bin/etcd)'"
  echo "export CSI_SANITY='$SANITY_BIN/csi-sanity'"
  echo "export CSI_PROVISIONER='$(sidecar_bin csi-provisioner "$CSI_PROVISIONER_VERSION")'"
  echo "export CSI_ATTACHER='$(sidecar_bin csi-attacher "$CSI_ATTACHER_VERSION")'"
  echo "export CSI_RESIZER='$(sidecar_bin csi-resizer "$CSI_RESIZER_VERSION")'"
  echo "export CSI_SNAPSHOTTER='$(sidecar_bin csi-snapshotter "$CSI_SNAPSHOTTER_VERSION")'"
  echo "export SNAPSHOT_CONTROLLER='$(sidecar_bin snapshot-controller "$CSI_SNAPSHOTTER_VERSION")'"
  echo "export VIRT_API='$KUBEVIRT_BIN/virt-api'"
  echo "export VIRT_CONTROLLER='$KUBEVIRT_BIN/virt-controller'"
  echo "export KUBEVIRT_MANIFESTS='$KUBEVIRT_BIN/manifests'"
}

# The dispatcher is one function called from the last line, followed by `exit`: bash reads a
# script as it runs it, so an edit to this file during a long build would otherwise be read
# from the old offset once the running command returns.
main() {
  local what=${1:-all}
  case "$what" in
    debs) stage debs debs ;;
    k8s) stage "kubernetes $K8S_VERSION" k8s ;;
    sanity) stage "csi-sanity $CSI_SANITY_VERSION" sanity ;;
    sidecars) stage "csi sidecars" sidecars ;;
    kubevirt) stage "kubevirt $KUBEVIRT_VERSION" kubevirt ;;
    all) stage debs debs; stage "kubernetes $K8S_VERSION" k8s; stage "csi-sanity $CSI_SANITY_VERSION" sanity; stage "csi sidecars" sidecars; stage "kubevirt $KUBEVIRT_VERSION" kubevirt ;;
    --env) print_env ;;
    *) die "unknown target '$what' (all|k8s|sanity|sidecars|kubevirt|debs|--env)" ;;
  esac
}

main "$@"; exit
