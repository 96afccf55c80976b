#!/usr/bin/env bash
# Runs every test the project keeps. Installs and caches what it needs first (hack/tools.sh),
# then: formatting, clippy, unit and integration tests (real apiserver, real mounts, QEMU).
# Each stage prints its wall time.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$KVCSI_ROOT"

stage tools "$KVCSI_ROOT/hack/tools.sh" all
stage crds "$KVCSI_ROOT/hack/crds.sh"
stage guest "$KVCSI_ROOT/hack/guest.sh"
eval "$("$KVCSI_ROOT/hack/tools.sh" --env)"

stage fmt cargo fmt --all -- --check
stage clippy cargo clippy --workspace --all-targets --locked -- -D warnings
stage build cargo build --workspace --all-targets --locked
stage test cargo test --workspace --locked -- --test-threads="${KVCSI_TEST_THREADS:-2}"
stage local-up "$KVCSI_ROOT/hack/local-up-test.sh"
# csi-sanity with the node plugin inside a QEMU worker VM, on KubeVirt's own virt-api and
# virt-controller: mount and block, scsi and virtio, split over the two feature-gate profiles
# (hack/sanity.sh says which runs on which).
stage sanity "$KVCSI_ROOT/hack/sanity.sh" all all
