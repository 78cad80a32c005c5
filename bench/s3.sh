#!/usr/bin/env bash
# bench/s3.sh BIN IMAGE [ROUNDS] -- blockvault backup and restore of IMAGE into a directory
# store and into an S3 store (radosgw on a throwaway bluestore test cluster, started here and
# stopped at the end), side by side in one run, alternating, ROUNDS times (default 2).
# Prints wall/user/sys seconds and peak RSS (KiB) of each.
# Needs the Ceph and radosgw packages (tests/ceph/install-deps.sh).
set -euo pipefail
BIN=$(readlink -f "${1:?usage: s3.sh BIN IMAGE [ROUNDS]}"); IMG=$(readlink -f "${2:?}"); ROUNDS=${3:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d /var/tmp/bv-s3bench.XXXXXX)
C=$W/ceph
cleanup() { "$HERE/../tests/ceph/stop-cluster.sh" "$C" >/dev/null 2>&1 || true; rm -rf "$W"; }
trap cleanup EXIT
trap "exit 143" TERM INT
BV_CEPH_BACKEND=bluestore BV_CEPH_MGR=0 BV_CEPH_OSD_GB=$(( $(stat -c %s "$IMG") * 3 / (1<<30) + 8 )) \
  "$HERE/../tests/ceph/start-cluster.sh" "$C" >/dev/null
# shellcheck disable=SC1091
eval "$("$HERE/../tests/ceph/start-rgw.sh" "$C")"
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
timed() { /usr/bin/time -f "%e %U %S %M" -o "$W/t" "$@" >/dev/null 2>"$W/err" || { cat "$W/err" >&2; exit 1; }; cat "$W/t"; }
for round in $(seq "$ROUNDS"); do
  for kind in dir s3; do
    rm -rf "$W/s" "$W/out.img"; mkdir -p "$W/s"
    if [ $kind = dir ]; then store="path = \"$W/s/store\""; else store="url = \"s3:$BV_S3_ENDPOINT/bench-$round\""; fi
    printf '[store]\n%s\n[catalog]\npath = "%s/s/catalog.sqlite"\n[[image]]\nname = "img"\nsource = "file:%s"\n' \
      "$store" "$W" "$IMG" > "$W/s/config.toml"
    "$BIN" --config "$W/s/config.toml" -q init >/dev/null
    b=$(timed "$BIN" --config "$W/s/config.toml" -q --no-progress backup img)
    r=$(timed "$BIN" --config "$W/s/config.toml" -q --no-progress restore img --to "$W/out.img")
    cmp -s "$IMG" "$W/out.img" || { echo "restore from $kind differs" >&2; exit 1; }
    echo "round $round $kind: backup [$b] restore [$r]"
  done
done
echo "(wall user sys seconds, max RSS KiB; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
