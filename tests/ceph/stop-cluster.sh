#!/usr/bin/env bash
# tests/ceph/stop-cluster.sh [--keep] DIR
#
# Stop a cluster started by tests/ceph/start-cluster.sh DIR and remove DIR.
# The daemons are those named by DIR/run/*.pid plus any ceph-mon/ceph-mgr/ceph-osd/radosgw whose
# command line names DIR/ceph.conf (a start interrupted before a pid file was written);
# no other process is ever signalled.  They get SIGKILL: the data is thrown away anyway.
# --keep: SIGTERM first (up to 20 s), then SIGKILL, and keep DIR (for its logs).
# A DIR that does not exist is not an error, an empty one is removed; a DIR without
# start-cluster.sh's marker is refused.
set -uo pipefail

KEEP=0
if [ "${1:-}" = --keep ]; then KEEP=1; shift; fi
[ $# -eq 1 ] || { echo "usage: $0 [--keep] DIR" >&2; exit 2; }
if [ ! -d "$1" ]; then echo "stop-cluster: $1 does not exist, nothing to stop" >&2; exit 0; fi
DIR=$(cd "$1" && pwd -P)
if [ -z "$(ls -A "$DIR")" ]; then
  # e.g. a mktemp -d directory whose start failed before writing anything
  rmdir -- "$DIR" && echo "stop-cluster: removed empty $DIR" >&2
  exit 0
fi
if [ ! -f "$DIR/.blockvault-test-cluster" ]; then
  echo "stop-cluster: $DIR was not made by start-cluster.sh (no .blockvault-test-cluster); refusing" >&2
  exit 1
fi
CONF=$DIR/ceph.conf

# is_ours PID: a ceph daemon started with "-c DIR/ceph.conf"
is_ours() {
  local args
  args=$(tr "\\0" " " 2>/dev/null <"/proc/$1/cmdline") || return 1
  case "$args" in
    ceph-mon\ *|ceph-mgr\ *|ceph-osd\ *|/usr/bin/ceph-mon\ *|/usr/bin/ceph-mgr\ *|/usr/bin/ceph-osd\ *) ;;
    radosgw\ *|/usr/bin/radosgw\ *) ;;
    *) return 1;;
  esac
  [[ "$args" == *" -c $CONF "* ]]
}
# running PID: exists and is not a zombie waiting to be reaped
running() {
  local stat
  stat=$(cat 2>/dev/null "/proc/$1/stat") || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

pids=()
add() { local p; for p in "${pids[@]}"; do [ "$p" = "$1" ] && return; done; pids+=("$1"); }
for f in "$DIR"/run/*.pid; do
  [ -f "$f" ] || continue
  p=$(tr -dc '0-9' <"$f")
  if [ -n "$p" ] && is_ours "$p"; then add "$p"; fi
done
for d in /proc/[0-9]*; do
  read -r comm 2>/dev/null <"$d/comm" || continue
  case "$comm" in ceph-mon|ceph-mgr|ceph-osd|radosgw) ;; *) continue;; esac
  p=${d#/proc/}
  if is_ours "$p"; then add "$p"; fi
done

# radosgw (tests/ceph/start-rgw.sh) first: a gateway whose cluster is gone hangs in its requests
"$(dirname "$0")/stop-rgw.sh" "$DIR"

if [ "$KEEP" = 1 ] && [ ${#pids[@]} -gt 0 ]; then
  kill -TERM "${pids[@]}" 2>/dev/null
  for _ in $(seq 200); do
    alive=0
    for p in "${pids[@]}"; do if running "$p"; then alive=1; fi; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
fi
for p in "${pids[@]}"; do if running "$p"; then kill -KILL "$p" 2>/dev/null; fi; done
for p in "${pids[@]}"; do
  for _ in $(seq 200); do running "$p" || break; sleep 0.05; done
  if running "$p"; then echo "stop-cluster: pid $p did not die" >&2; exit 1; fi
done

if [ "$KEEP" = 1 ]; then
  echo "stop-cluster: stopped ${#pids[@]} daemon(s), kept $DIR" >&2
else
  rm -rf -- "$DIR"
  echo "stop-cluster: stopped ${#pids[@]} daemon(s), removed $DIR" >&2
fi
