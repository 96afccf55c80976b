#!/usr/bin/env bash
# A newcomer's first half hour, as a test: runs every command of README.md's "Trying it
# locally" section in order (start the stack detached, source _output/local/env, the demo,
# status, the by-hand commands, down) on a PATH where no kubectl exists until the env file
# adds the one hack/tools.sh built. Also checks that every command hack/local-up.sh and its
# demo tell the user to type is one of those README commands, so none of them can rot.
# Exits non-zero if any command fails; never leaves the stack running.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$KVCSI_ROOT"

work="$KVCSI_ROOT/_output/local-up-test"
rm -rf "$work"
mkdir -p "$work/shadow"

if [ -f _output/local/local-up.pid ] && kill -0 "$(cat _output/local/local-up.pid)" 2>/dev/null; then
  die "a local stack is already running (pid $(cat _output/local/local-up.pid)); this test starts its own: stop it with hack/local-up.sh down"
fi

# The shell lines of the README section, in order, without comments.
awk '/^## Trying it locally/ {s=1; next} /^## / {s=0} s && /^```sh/ {f=1; next} s && /^```/ {f=0; next} s && f' README.md \
  | sed -e 's/[[:space:]]\+#.*$//' -e 's/[[:space:]]*$//' | grep -v '^$' >"$work/readme.sh" || true
[ -s "$work/readme.sh" ] || die "README.md's 'Trying it locally' has no sh block"
for must in 'hack/local-up.sh -d' 'source _output/local/env' 'hack/local-up.sh demo' 'hack/local-up.sh status'; do
  grep -qxF "$must" "$work/readme.sh" || die "README.md's 'Trying it locally' lacks '$must'"
done
[ "$(tail -1 "$work/readme.sh")" = "hack/local-up.sh down" ] || die "README.md's 'Trying it locally' does not end with hack/local-up.sh down"
log "README commands:"; sed 's/^/    /' "$work/readme.sh" >&2

# A PATH with no kubectl on it: every directory that has one is replaced by a directory of
# links to everything else in it.
newpath="" n=0
IFS=: read -ra dirs <<<"$PATH"
for d in "${dirs[@]}"; do
  [ -n "$d" ] && [ -d "$d" ] || continue
  if [ -e "$d/kubectl" ]; then
    n=$((n + 1))
    shadow="$work/shadow/$n"
    mkdir -p "$shadow"
    for f in "$d"/* "$d"/.[!.]*; do
      [ -e "$f" ] || [ -L "$f" ] || continue
      [ "${f##*/}" = kubectl ] || ln -s "$f" "$shadow/${f##*/}"
    done
    log "PATH: $d has a kubectl; using $shadow without it"
    d=$shadow
  fi
  newpath="${newpath:+$newpath:}$d"
done
if PATH="$newpath" command -v kubectl >/dev/null; then
  die "kubectl is still on the test PATH: $(PATH="$newpath" command -v kubectl)"
fi

{
  echo 'set -euo pipefail'
  # Each command is echoed before it runs, as a reader would type it.
  while IFS= read -r line; do
    printf 'printf "\\n$ %%s\\n" %q\n' "$line"
    printf '%s\n' "$line"
  done <"$work/readme.sh"
  echo 'command -v kubectl'
} >"$work/run.sh"

stop() { "$KVCSI_ROOT/hack/local-up.sh" down >/dev/null 2>&1 || true; }
trap stop EXIT
rc=0
# A bound on the whole walk-through: a cold first -d (Go builds) alone takes ~25 minutes.
PATH="$newpath" timeout "${KVCSI_LOCAL_UP_TEST_TIMEOUT:-3600}" bash "$work/run.sh" >"$work/run.log" 2>&1 || rc=$?
cat "$work/run.log"
[ "$rc" -eq 0 ] || die "the README walk-through failed (exit $rc; log $work/run.log)"

# Every command local-up and the demo print for the user is a README command.
awk '/^next:$/ {s=1; next} /^By hand:$|By hand:$/ {s=1; next} s && /^  [^ ]/ {print; next} {s=0}' "$work/run.log" \
  | sed -e 's/^  //' -e 's/[[:space:]]\+#.*$//' -e 's/[[:space:]]*$//' | sort -u >"$work/printed.txt"
[ -s "$work/printed.txt" ] || die "found no commands printed by hack/local-up.sh in the log"
missing=$(grep -vxF -f "$work/readme.sh" "$work/printed.txt" || true)
[ -z "$missing" ] || die "hack/local-up.sh printed commands that README.md's 'Trying it locally' does not run: $missing"
grep -q '^demo passed' "$work/run.log" || die "the demo did not report success"
log "README walk-through passed on a PATH without a system kubectl ($(wc -l <"$work/readme.sh") commands; $(wc -l <"$work/printed.txt") printed commands checked)"
