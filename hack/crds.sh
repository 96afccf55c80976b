#!/usr/bin/env bash
# Writes the CustomResourceDefinitions the tests install into their kube-apiserver:
#   kubevirt.io/v1            VirtualMachine, VirtualMachineInstance
#   cdi.kubevirt.io/v1beta1   DataVolume
#   snapshot.storage.k8s.io/v1 VolumeSnapshot, VolumeSnapshotContent, VolumeSnapshotClass
# with the upstream structural schemas. Upstream code is not committed here: the schemas are
# taken at set-up time from the published Go modules (Go module proxy) and assembled by
# hack/crds_gen.py into $KVCSI_CACHE/crds/<key>/, one manifest per kind. See hack/crds-README.md.
#
# Usage: hack/crds.sh          generate (a no-op when the cached directory is complete)
#        hack/crds.sh --dir    print the directory (does not generate)
set -euo pipefail
. "$(dirname "$0")/lib.sh"

# Pinned module versions. A bump needs the new h1: sum below (the script prints it).
KUBEVIRT_MODULE_VERSION="${KUBEVIRT_MODULE_VERSION:-v1.7.0}"         # kubevirt.io/kubevirt and kubevirt.io/api
CDI_MODULE_VERSION="${CDI_MODULE_VERSION:-v1.64.0}"                   # kubevirt.io/containerized-data-importer
SNAPSHOTTER_CLIENT_VERSION="${SNAPSHOTTER_CLIENT_VERSION:-v8.7.0}"    # github.com/kubernetes-csi/external-snapshotter/client/v8

KV_MOD=kubevirt.io/kubevirt
KV_API_MOD=kubevirt.io/api
CDI_MOD=kubevirt.io/containerized-data-importer
SNAP_MOD=github.com/kubernetes-csi/external-snapshotter/client/v8

# Module zip hashes (go.sum "h1:" form). CDI's releases are on the proxy but not in the public
# checksum database, so the Go tool cannot verify them; we check every module ourselves.
declare -A MODULE_SUMS=(
  ["$KV_MOD@v1.7.0"]="h1:Emz0v1IGKwTvWvD+d0mZmfZFvVCxreSAPAUQnp0ZhZI="
  ["$KV_API_MOD@v1.7.0"]="h1:Kxmtk6HtFkKpZA7UcTRHWoxFKnwJaUmPzTXQVmvP5Bc="
  ["$CDI_MOD@v1.64.0"]="h1:e7GkbDL3/Jyya9WDWRAMpL+SEvS1QvMQIQOHilF20Vg="
  ["$SNAP_MOD@v8.7.0"]="h1:HVaSUeRRHPu49aSiL8eXOjS9Re9G6pM0NzdTGI7mM14="
)

# The files a complete directory holds (names chosen in hack/crds_gen.py).
CRD_FILES=(
  virtualmachines.kubevirt.io.yaml
  virtualmachineinstances.kubevirt.io.yaml
  datavolumes.cdi.kubevirt.io.yaml
  snapshot.storage.k8s.io_volumesnapshots.yaml
  snapshot.storage.k8s.io_volumesnapshotcontents.yaml
  snapshot.storage.k8s.io_volumesnapshotclasses.yaml
)

HACK_DIR="$KVCSI_ROOT/hack"
GEN="$HACK_DIR/crds_gen.py"
# The key names the pinned versions, plus a short hash of the generator so a change to it
# regenerates instead of reusing stale output.
gen_hash=$(cat "$GEN" "$HACK_DIR/crds.sh" | sha256sum | cut -c1-8)
CRDS_DIR="$KVCSI_CACHE/crds/kubevirt-${KUBEVIRT_MODULE_VERSION}_cdi-${CDI_MODULE_VERSION}_snapshotter-${SNAPSHOTTER_CLIENT_VERSION}_gen-${gen_hash}"
MARKER=.complete

if [ "${1:-}" = "--dir" ]; then
  echo "$CRDS_DIR"
  exit 0
fi
[ $# -eq 0 ] || die "usage: $0 [--dir]"

complete() {
  [ -f "$CRDS_DIR/$MARKER" ] || return 1
  local f
  for f in "${CRD_FILES[@]}"; do [ -s "$CRDS_DIR/$f" ] || return 1; done
}

if complete; then
  log "CRDs cached in $CRDS_DIR"
  exit 0
fi

# download MODULE@VERSION: fetch through the Go module proxy, check the pinned sum, print the dir.
download() {
  local modver=$1 want=${MODULE_SUMS[$1]:-} json dir sum err
  json=$(cd "$work" && GOFLAGS= GOWORK=off GOTOOLCHAIN=local GONOSUMDB="$CDI_MOD" \
         go mod download -json "$modver") || true
  read -r dir sum err < <(python3 -c '
import json, sys
o = json.loads(sys.stdin.read() or "{}")
print(o.get("Dir", "-"), o.get("Sum", "-"), o.get("Error", "-").replace("\n", " "))' <<<"$json")
  [ "$dir" != "-" ] && [ -d "$dir" ] || die "go mod download $modver failed: $err"
  [ -n "$want" ] || die "no pinned sum for $modver; after checking it, add [\"$modver\"]=\"$sum\" to MODULE_SUMS in hack/crds.sh"
  [ "$sum" = "$want" ] || die "$modver: sum $sum does not match the pinned $want"
  echo "$dir"
}

generate() {
  command -v go >/dev/null || die "go is needed to download the schema modules"
  command -v python3 >/dev/null || apt_ensure python3
  python3 -c 'import yaml' 2>/dev/null || apt_ensure python3-yaml

  mkdir -p "$KVCSI_CACHE/crds"
  work=$(mktemp -d "$KVCSI_CACHE/crds/.tmp.XXXXXX")
  trap 'rm -rf "$work"' EXIT

  local kv kv_api cdi snap
  kv=$(download "$KV_MOD@$KUBEVIRT_MODULE_VERSION")
  kv_api=$(download "$KV_API_MOD@$KUBEVIRT_MODULE_VERSION")
  cdi=$(download "$CDI_MOD@$CDI_MODULE_VERSION")
  snap=$(download "$SNAP_MOD@$SNAPSHOTTER_CLIENT_VERSION")

  mkdir "$work/out"
  python3 "$GEN" --out "$work/out" \
    --kubevirt "$kv" --kubevirt-ref "$KV_MOD@$KUBEVIRT_MODULE_VERSION" \
    --kubevirt-api "$kv_api" --kubevirt-api-ref "$KV_API_MOD@$KUBEVIRT_MODULE_VERSION" \
    --cdi "$cdi" --cdi-ref "$CDI_MOD@$CDI_MODULE_VERSION" \
    --snapshotter "$snap" --snapshotter-ref "$SNAP_MOD@$SNAPSHOTTER_CLIENT_VERSION" >/dev/null \
    || die "crds_gen.py failed"
  local f
  for f in "${CRD_FILES[@]}"; do [ -s "$work/out/$f" ] || die "crds_gen.py did not write $f"; done
  printf '%s\n' "${CRD_FILES[@]}" > "$work/out/$MARKER"

  # Publish atomically: a reader sees either no directory or a complete one.
  rm -rf "$CRDS_DIR"
  mv "$work/out" "$CRDS_DIR"
  log "CRDs written to $CRDS_DIR"
}

stage crds generate
