# shellcheck shell=bash
# Shared helpers for hack/ scripts: cache locations, pinned versions, stage timing.
# Sourced, never executed.

KVCSI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KVCSI_CACHE="${KVCSI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubevirt-csi}"

# Pinned versions. Bumping one of these rebuilds only that tool.
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
CSI_SANITY_VERSION="${CSI_SANITY_VERSION:-v5.4.0}"
# CSI sidecars (hack/tools.sh sidecars, and the images deploy/ names). One release line: the
# releases built against k8s.io/* v0.36 and CSI spec v1.12.0 (the next ones move to spec 1.13);
# their READMEs give minimum Kubernetes versions of 1.16-1.20, well below our 1.34. Module
# paths carry the major version (/v6, /v4, ...). Keep deploy/ image tags equal to these.
CSI_PROVISIONER_VERSION="${CSI_PROVISIONER_VERSION:-v6.3.0}"
CSI_ATTACHER_VERSION="${CSI_ATTACHER_VERSION:-v4.12.0}"
CSI_RESIZER_VERSION="${CSI_RESIZER_VERSION:-v2.2.0}"
CSI_SNAPSHOTTER_VERSION="${CSI_SNAPSHOTTER_VERSION:-v8.6.0}"
# Image-only pins: these two modules are declared without a /v2 suffix, so their v2.x tags are
# not valid module versions, and the module proxy this project can reach refuses them anyway.
# hack/tools.sh does not build them; deploy/ uses their images at these versions.
CSI_NODE_DRIVER_REGISTRAR_VERSION="${CSI_NODE_DRIVER_REGISTRAR_VERSION:-v2.17.0}"
CSI_LIVENESSPROBE_VERSION="${CSI_LIVENESSPROBE_VERSION:-v2.19.0}"
# KubeVirt's virt-api and virt-controller (hack/tools.sh kubevirt), built from the Go module
# kubevirt.io/kubevirt with kubevirt.io/api and kubevirt.io/client-go at the same version.
KUBEVIRT_VERSION="${KUBEVIRT_VERSION:-v1.7.0}"
# Debian bookworm ships etcd 3.4.23; kube-apiserver <= 1.34 works with it.
ETCD_DEB_VERSION_PREFIX="3.4."

export KVCSI_ROOT KVCSI_CACHE K8S_VERSION CSI_SANITY_VERSION KUBEVIRT_VERSION
export CSI_PROVISIONER_VERSION CSI_ATTACHER_VERSION CSI_RESIZER_VERSION CSI_SNAPSHOTTER_VERSION
export CSI_NODE_DRIVER_REGISTRAR_VERSION CSI_LIVENESSPROBE_VERSION

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# stage NAME CMD...: run CMD and print how long it took, so slow stages show up in CI logs.
stage() {
  local name=$1; shift
  local start end rc
  start=$(date +%s.%N)
  log "stage '$name' started"
  if "$@"; then rc=0; else rc=$?; fi
  end=$(date +%s.%N)
  log "$(awk -v n="$name" -v s="$start" -v e="$end" -v r="$rc" 'BEGIN{printf "stage \x27%s\x27 finished in %.1fs (exit %d)", n, e-s, r}')"
  return $rc
}

# heartbeat CMD...: run CMD, printing a line every 30 s while it runs, so a long silent
# `go build` is not mistaken for a hang in CI logs.
heartbeat() {
  local start; start=$(date +%s)
  "$@" &
  local pid=$! rc
  while kill -0 "$pid" 2>/dev/null; do
    local i
    for i in $(seq 30); do
      sleep 1
      kill -0 "$pid" 2>/dev/null || break 2
    done
    log "still running after $(( $(date +%s) - start ))s: ${*:1:2}"
  done
  if wait "$pid"; then rc=0; else rc=$?; fi
  return $rc
}

apt_updated=""
# apt_ensure PKG...: install the Debian packages that are missing, with one apt-get update at most.
apt_ensure() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  if [ -z "$apt_updated" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
    || die "apt-get install ${missing[*]} failed"
}
