#!/usr/bin/env bash
# tests/ceph/stop-rgw.sh DIR -- SIGKILL the radosgw that tests/ceph/start-rgw.sh DIR started
# (and only it: the pid in DIR/run/rgw.pid, checked to be a radosgw of DIR/ceph.conf), and
# wait until it is gone.  The cluster keeps running; start-rgw.sh DIR starts it again.
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
[ -d "$1" ] || exit 0
DIR=$(cd "$1" && pwd -P)
f=$DIR/run/rgw.pid
[ -f "$f" ] || exit 0
p=$(tr -dc '0-9' <"$f")
[ -n "$p" ] || exit 0
args=$(tr "\\0" " " 2>/dev/null <"/proc/$p/cmdline") || exit 0
case "$args" in radosgw\ *|/usr/bin/radosgw\ *) ;; *) exit 0;; esac
[[ "$args" == *" -c $DIR/ceph.conf "* ]] || exit 0
kill -KILL "$p" 2>/dev/null
for _ in $(seq 200); do [ -e "/proc/$p" ] || break; sleep 0.05; done
rm -f "$f"
