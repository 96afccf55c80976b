#!/usr/bin/env bash
# Runs the whole driver stack locally: infra cluster with KubeVirt's own virt-api and
# virt-controller (v1.7, HotplugVolumes gate; CDI, kubelet and virt-handler are stand-ins),
# a QEMU worker VM with the node plugin, the controller plugin, a guest cluster with
# kube-controller-manager, and the real CSI sidecars. Kubeconfigs land in _output/local/.
# KVCSI_LOCAL_BED=declarative|standin picks the DeclarativeHotplugVolumes-only profile or the
# hand-written KubeVirt stand-in instead.
#
# Usage: hack/local-up.sh        build what is needed, run in the foreground until Ctrl-C
#        hack/local-up.sh -d     same, detached: returns once ready (pid in _output/local/)
#        hack/local-up.sh demo   on a running stack: deploy/example through the whole flow,
#                                step by step with timings, then clean up (non-zero on failure;
#                                `demo --help` lists its options, e.g. --step-timeout)
#        hack/local-up.sh status what is running, its endpoints and log files (exit 3: none)
#        hack/local-up.sh down   stop the stack and check nothing of it is left
#
# Once up, `source _output/local/env` puts the kubectl this project builds (no system kubectl
# needed) and the workspace binaries (kvcsi-guest-exec) on PATH, points KUBECONFIG at the guest
# cluster and INFRA_KUBECONFIG at the infra cluster.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$KVCSI_ROOT"

out="$KVCSI_ROOT/_output/local"
pidfile="$out/local-up.pid"
logfile="$out/local-up.log"
envfile="$out/env"
bin="$KVCSI_ROOT/target/debug/kvcsi-local-up"
mkdir -p "$out"

# Processes of a run carry its scratch directories (…/kvcsi-harness/<pid>-N-…) in their
# command lines: that is how leftovers are recognised.
leftovers() { pgrep -f "kvcsi-harness/$1-" || true; }

running_pid() {
  [ -f "$pidfile" ] || return 1
  local pid; pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

down() {
  [ -f "$pidfile" ] || { log "no $pidfile: nothing to stop"; rm -f "$envfile"; return 0; }
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
  rm -f "$pidfile" "$out/ready" "$out/infra.kubeconfig" "$out/guest.kubeconfig" "$out/stack.env" "$envfile"
  log "stopped; no processes of run $pid left"
}

# kill_tree PID: TERM every descendant of PID, deepest first.
kill_tree() {
  local c
  for c in $(pgrep -P "$1" || true); do
    kill_tree "$c"
    kill -TERM "$c" 2>/dev/null || true
  done
}

build() {
  # heartbeat runs tools.sh in the background, where a non-interactive shell ignores SIGINT
  # (and go build keeps ignoring it): on Ctrl-C, stop the build's processes ourselves.
  trap 'log "interrupted: stopping the build"; kill_tree $$; exit 130' INT TERM
  # A cold run builds kubernetes, the sidecars and KubeVirt from Go modules (about 25 minutes
  # on 2 cores, see README); the heartbeat shows it is alive between tools.sh's own lines.
  stage tools heartbeat "$KVCSI_ROOT/hack/tools.sh" all >&2
  stage crds "$KVCSI_ROOT/hack/crds.sh" >&2
  stage guest "$KVCSI_ROOT/hack/guest.sh" >/dev/null
  stage cargo cargo build --workspace --bins --locked >&2
  trap - INT TERM
}

# The shell side of a running stack: the pinned kubectl and the workspace binaries first on
# PATH, both kubeconfigs, and what the binary wrote about the stack (agent address, ...).
write_env() {
  local kubectl_dir; kubectl_dir=$(dirname "$KUBECTL")
  [ -x "$kubectl_dir/kubectl" ] || die "no kubectl in $kubectl_dir (hack/tools.sh k8s builds it)"
  {
    echo "# source _output/local/env: the local kubevirt-csi stack (written by hack/local-up.sh)."
    echo "# kubectl $K8S_VERSION is the one hack/tools.sh built; kvcsi-guest-exec runs commands in the worker VM."
    printf 'export PATH=%q:%q:"$PATH"\n' "$kubectl_dir" "$KVCSI_ROOT/target/debug"
    printf 'export KUBECONFIG=%q\n' "$out/guest.kubeconfig"
    printf 'export INFRA_KUBECONFIG=%q\n' "$out/infra.kubeconfig"
    cat "$out/stack.env"
  } >"$envfile.tmp"
  mv "$envfile.tmp" "$envfile"
}

# What to type next. Every line is also in README.md's "Trying it locally", which
# hack/local-up-test.sh runs on a PATH without a system kubectl.
print_next() {
  cat <<'EOF'
next:
  source _output/local/env
  hack/local-up.sh demo
  hack/local-up.sh status
  kubectl get nodes,storageclasses,csidrivers
  kubectl --kubeconfig "$INFRA_KUBECONFIG" -n tenant-a get vm,vmi
  hack/local-up.sh down
EOF
}

# wait_ready PID: until the binary writes $out/ready, or fail with its log if it exits first.
wait_ready() {
  local pid=$1
  while [ ! -f "$out/ready" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$pidfile"
      tail -40 "$logfile" >&2
      die "kvcsi-local-up exited before it was ready (log: $logfile)"
    fi
    sleep 0.2
  done
}

status() {
  local pid
  if ! pid=$(running_pid); then
    echo "not running (no live pid in $pidfile)"
    [ ! -f "$envfile" ] || echo "stale $envfile left from a run that did not stop cleanly: hack/local-up.sh down"
    return 3
  fi
  if [ ! -f "$out/stack.env" ]; then
    echo "kvcsi-local-up pid $pid is starting (log: $logfile)"
    return 0
  fi
  # shellcheck disable=SC1091
  . "$out/stack.env"
  eval "$("$KVCSI_ROOT/hack/tools.sh" --env)"
  local since; since=$(ps -o lstart= -p "$pid" | sed 's/  */ /g')
  echo "kubevirt-csi local stack: kvcsi-local-up pid $pid, started $since, ready in $(cat "$out/ready" 2>/dev/null || echo ?)s"
  echo
  echo "processes:"
  ps -o pid=,etime=,rss=,comm= -p "$pid" | awk '{printf "  %-7s %-10s %6d MiB  %s\n", $1, $2, $3/1024, $4}'
  local p
  for p in $(leftovers "$pid"); do
    ps -o pid=,etime=,rss=,comm= -p "$p" 2>/dev/null | awk '{printf "  %-7s %-10s %6d MiB  %s\n", $1, $2, $3/1024, $4}'
  done
  echo "  (the node plugin runs inside the VM, under qemu pid $KVCSI_QEMU_PID)"
  echo
  echo "endpoints:"
  local ready
  ready=$("$KUBECTL" --kubeconfig "$out/infra.kubeconfig" get --raw /readyz 2>&1 | tail -1) || true
  echo "  infra apiserver   $KVCSI_INFRA_SERVER  (readyz: $ready; INFRA_KUBECONFIG=$out/infra.kubeconfig)"
  ready=$("$KUBECTL" --kubeconfig "$out/guest.kubeconfig" get --raw /readyz 2>&1 | tail -1) || true
  echo "  guest apiserver   $KVCSI_GUEST_SERVER  (readyz: $ready; KUBECONFIG=$out/guest.kubeconfig)"
  echo "  controller        unix://$KVCSI_CONTROLLER_SOCKET  (infra namespace $KVCSI_INFRA_NAMESPACE)"
  echo "  node plugin       $KVCSI_NODE_ENDPOINT  (inside worker VM $KVCSI_WORKER_VM, guest node $KVCSI_GUEST_NODE; kubelet root $KVCSI_KUBELET_ROOT)"
  echo "  guest agent       $KVCSI_GUEST_AGENT  (kvcsi-guest-exec -- <command> runs it in the VM)"
  echo
  echo "logs:"
  echo "  $logfile"
  find "$KVCSI_STACK_DIR" "$KVCSI_INFRA_DIR" "$KVCSI_GUEST_DIR" "$KVCSI_VM_DIR" \
    "$(dirname "$KVCSI_CONTROLLER_SOCKET")" -maxdepth 2 \
    \( -name '*.log' -o -name 'console*' \) -type f 2>/dev/null | sort -u | sed 's/^/  /'
}

demo() {
  running_pid >/dev/null || die "no local stack is running: start one with hack/local-up.sh -d"
  [ -f "$envfile" ] || die "no $envfile although the stack runs; is it still starting?"
  # The demo uses exactly what a user's shell gets from the env file.
  # shellcheck disable=SC1090
  . "$envfile"
  [ -x "$bin" ] || die "no $bin: run hack/local-up.sh once to build it"
  "$bin" demo --example deploy/example "$@"
}

bed=${KVCSI_LOCAL_BED:-hotplug}
mode=fg
case "${1:-}" in
  down) down; exit 0 ;;
  status) status; exit $? ;;
  demo) shift; demo "$@"; exit $? ;;
  -d) mode=detached ;;
  "") ;;
  *) die "usage: $0 [-d|demo|status|down]" ;;
esac

if pid=$(running_pid); then
  die "already running (pid $pid); run '$0 down' first"
fi
start=$(date +%s.%N)
build
eval "$("$KVCSI_ROOT/hack/tools.sh" --env)"
rm -f "$out/ready" "$out/stack.env" "$envfile"

if [ "$mode" = fg ]; then
  # In the foreground the binary's output goes to the terminal and to the log; Ctrl-C
  # reaches it directly, and TERM is passed on.
  "$bin" up --out "$out" --bed "$bed" > >(tee "$logfile") 2>&1 &
  pid=$!
  echo "$pid" >"$pidfile"
  trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM
  wait_ready "$pid"
  write_env
  print_next
  log "env written: source _output/local/env (in another shell); Ctrl-C or hack/local-up.sh down stops the stack"
  rc=0
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || rc=$?; done
  rm -f "$pidfile" "$envfile"
  exit "$rc"
fi

setsid "$bin" up --out "$out" --bed "$bed" >"$logfile" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pidfile"
wait_ready "$pid"
write_env
took=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')
sed -n '/local stack is up/,$p' "$logfile" | grep -v '^\[' | sed -n '1,/^logs:/p'
print_next
log "detached in ${took}s (stack itself: $(cat "$out/ready")s); pid $pid in $pidfile; log $logfile"
log "now: source _output/local/env"
