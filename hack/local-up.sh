#!/usr/bin/env bash
# Runs the whole driver stack locally: infra cluster + KubeVirt/CDI stand-in, a QEMU worker
# VM with the node plugin, the controller plugin, a guest cluster with
# kube-controller-manager, and the real CSI sidecars. Kubeconfigs land in _output/local/.
#
# Usage: hack/local-up.sh        build what is needed, run in the foreground until Ctrl-C
#        hack/local-up.sh -d     same, detached: returns once ready (pid in _output/local/)
#        hack/local-up.sh down   stop a detached stack and check nothing of it is left
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$KVCSI_ROOT"

out="$KVCSI_ROOT/_output/local"
pidfile="$out/local-up.pid"
logfile="$out/local-up.log"
mkdir -p "$out"

# Processes of a run carry its scratch directories (…/kvcsi-harness/<pid>-N-…) in their
# command lines: that is how leftovers are recognised.
leftovers() { pgrep -f "kvcsi-harness/$1-" || true; }

down() {
  [ -f "$pidfile" ] || { log "no $pidfile: nothing to stop"; return 0; }
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping kvcsi-local-up (pid $pid)"
    kill -TERM "$pid"
    local i
    for i in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid did not exit in 30s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  # Children die with their parent (SIGKILL from drop, and pdeathsig); give the kernel a
  # moment to reap, then insist.
  local left i
  for i in $(seq 1 50); do left=$(leftovers "$pid"); [ -z "$left" ] && break; sleep 0.1; done
  if [ -n "$left" ]; then
    log "leftover processes of run $pid: $(echo $left)"; kill -KILL $left 2>/dev/null || true
    sleep 0.5
    left=$(leftovers "$pid")
    [ -z "$left" ] || die "processes of run $pid survive: $(echo $left)"
  fi
  rm -f "$pidfile" "$out/ready" "$out/infra.kubeconfig" "$out/guest.kubeconfig"
  log "stopped; no processes of run $pid left"
}

build() {
  stage tools "$KVCSI_ROOT/hack/tools.sh" all >&2
  stage crds "$KVCSI_ROOT/hack/crds.sh" >&2
  stage guest "$KVCSI_ROOT/hack/guest.sh" >/dev/null
  stage cargo cargo build --workspace --bins --locked >&2
}

case "${1:-}" in
  down) down; exit 0 ;;
  -d|"") ;;
  *) die "usage: $0 [-d|down]" ;;
esac

if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  die "already running (pid $(cat "$pidfile")); run '$0 down' first"
fi
start=$(date +%s.%N)
build
eval "$("$KVCSI_ROOT/hack/tools.sh" --env)"
bin="$KVCSI_ROOT/target/debug/kvcsi-local-up"

if [ "${1:-}" != "-d" ]; then
  exec "$bin" --out "$out"
fi

rm -f "$out/ready"
setsid "$bin" --out "$out" >"$logfile" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pidfile"
# The binary writes $out/ready once everything is up; it offers no other signal.
while [ ! -f "$out/ready" ]; do
  if ! kill -0 "$pid" 2>/dev/null; then
    rm -f "$pidfile"
    tail -40 "$logfile" >&2
    die "kvcsi-local-up exited before it was ready (log: $logfile)"
  fi
  sleep 0.2
done
took=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')
sed -n '/local stack is up/,$p' "$logfile" | grep -v '^\[' | sed -n '1,/^logs:/p'
log "detached in ${took}s (stack itself: $(cat "$out/ready")s); pid $pid in $pidfile; log $logfile; stop with: hack/local-up.sh down"
