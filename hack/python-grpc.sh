#!/usr/bin/env bash
# Installs a Python gRPC client (grpcio, pinned) into a venv under $KVCSI_CACHE and prints the
# venv's python on stdout. Tests that check the plugins against a non-Go CSI client call this;
# any failure is loud (non-zero exit, message on stderr), never a skipped test.
#
# Usage: hack/python-grpc.sh        -> prints /path/to/venv/bin/python
set -euo pipefail
. "$(dirname "$0")/lib.sh"

GRPCIO_VERSION="${GRPCIO_VERSION:-1.76.0}"
VENV="$KVCSI_CACHE/python-grpc-$GRPCIO_VERSION"

# A fresh Debian machine may lack venv support: install it like every other tool.
apt_ensure python3 python3-venv
if ! "$VENV/bin/python" -c "import grpc, sys; sys.exit(grpc.__version__ != '$GRPCIO_VERSION')" 2>/dev/null; then
  log "installing grpcio $GRPCIO_VERSION into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2 || die "python3 -m venv failed (apt-get install python3-venv)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "grpcio==$GRPCIO_VERSION" >&2 \
    || die "pip install grpcio==$GRPCIO_VERSION failed"
  "$VENV/bin/python" -c "import grpc" || die "grpcio installed but does not import"
fi
echo "$VENV/bin/python"
