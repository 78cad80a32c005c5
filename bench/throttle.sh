#!/usr/bin/env bash
# bench/throttle.sh [BIN] [SIZE_MIB] [RATE] -- how close a throttled backup
# reads to its `read-bandwidth`. One image of SIZE_MIB (default 256) of
# random data, as a file and as an RBD image on a throwaway test cluster
# (tests/ceph/start-cluster.sh; skipped with NO_RBD=1). Then, alternating,
# ROUNDS (default 3) full backups of each source with `read-bandwidth =
# RATE` (default "32M", binary units per second) and without it.
# A file backup reads every allocated extent each time (no change tracking);
# for RBD each throttled round first runs `blockvault release` so that the
# backup is a full read too. Prints, per run, the bytes read, the backup's
# own duration (from `list --json`: snapshot, reads, commit) and the rate
# read_bytes / duration in MiB/s, and the load average.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${1:-$HERE/../target/debug/blockvault}
MIB=${2:-256}
RATE=${3:-32M}
ROUNDS=${ROUNDS:-3}
[ -x "$BIN" ] || { echo "no blockvault binary at $BIN (cargo build -p blockvault)" >&2; exit 1; }
W=$(mktemp -d /var/tmp/bv-throttle-bench.XXXXXX)
CL=
IMG=bv-throttle-$$
cleanup() {
  if [ -n "$CL" ]; then
    rbd snap purge "rbd/$IMG" >/dev/null 2>&1 || true
    rbd rm --no-progress "rbd/$IMG" >/dev/null 2>&1 || true
    "$HERE/../tests/ceph/stop-cluster.sh" "$CL" >/dev/null 2>&1 || true
  fi
  rm -rf "$W"
}
trap cleanup EXIT

dd if=/dev/urandom of="$W/img.raw" bs=1M count="$MIB" status=none
cfg() { # $1 = config file, $2 = extra image keys
  {
    printf '[store]\npath = "%s/store"\n[catalog]\npath = "%s/catalog.sqlite"\n' "$W" "$W"
    printf '[[image]]\nname = "file"\nsource = "file:%s/img.raw"\n%b\n' "$W" "$2"
    if [ -n "$CL" ]; then printf '[[image]]\nname = "rbd"\nsource = "rbd:rbd/%s"\n%b\n' "$IMG" "$2"; fi
  } > "$1"
}
if [ "${NO_RBD:-0}" != 1 ]; then
  CL=$W/cluster
  eval "$("$HERE/../tests/ceph/start-cluster.sh" "$CL" 2>"$W/cluster.log")"
  rbd import --no-progress "$W/img.raw" "rbd/$IMG"
fi
cfg "$W/free.toml" ""
cfg "$W/slow.toml" "read-bandwidth = \"$RATE\""
bv() { "$BIN" --config "$1" -q --no-progress "${@:2}"; }
bv "$W/free.toml" init >/dev/null

report() { # $1 = label, $2 = image
  bv "$W/free.toml" list --json | python3 -c '
import json, sys
b = [x for x in json.load(sys.stdin) if x["image"] == sys.argv[2]][-1]
mib = b["read_bytes"] / 2**20
print("%-14s %-4s read %8.1f MiB in %7.2f s = %7.1f MiB/s" % (sys.argv[1], sys.argv[2], mib, b["duration_ms"] / 1000, mib / (b["duration_ms"] / 1000)))
' "$1" "$2"
}
echo "image ${MIB} MiB random, read-bandwidth = \"$RATE\", load $(cut -d' ' -f1-3 /proc/loadavg)"
images="file"; [ -n "$CL" ] && images="file rbd"
for r in $(seq "$ROUNDS"); do
  for i in $images; do
    [ "$i" = rbd ] && { bv "$W/free.toml" release rbd >/dev/null 2>&1 || true; }
    bv "$W/slow.toml" backup "$i" >/dev/null; report "throttled $r" "$i"
    [ "$i" = rbd ] && { bv "$W/free.toml" release rbd >/dev/null 2>&1 || true; }
    bv "$W/free.toml" backup "$i" >/dev/null; report "unthrottled $r" "$i"
  done
done
echo "load $(cut -d' ' -f1-3 /proc/loadavg)"
