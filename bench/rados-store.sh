#!/usr/bin/env bash
# bench/rados-store.sh [SIZE_MIB] [BIN] [ROUNDS] -- the three stores side by side
# in one run on one machine: a throwaway cluster with a bluestore OSD
# (tests/ceph/start-cluster.sh) and radosgw on it (tests/ceph/start-rgw.sh),
# a random image of SIZE_MIB (default 1024), then, ROUNDS times (default 1),
# for each store (directory, RADOS pool, S3 bucket) a first backup into an
# empty store and a restore (wall seconds, MiB/s of the image), interleaved
# with `rados bench` 4 MiB writes (16 in flight, what a backup's chunk writes
# are) on the same pool, the limit to compare the RADOS store's chunk writes
# with, and the RADOS backend's own chunk writes (agent/examples/chunk-writes.rs:
# the same 4 MiB writes, 16 in flight, with no image to read and nothing to
# hash; built when missing). Each store is removed after its round (disk).
# Needs root (drops the page cache), Ceph and radosgw (tests/ceph/install-deps.sh).
set -euo pipefail
SIZE=${1:-1024}
BIN=$(readlink -f "${2:-$(dirname "$0")/../target/release/blockvault}")
ROUNDS=${3:-1}
HERE=$(cd "$(dirname "$0")/.." && pwd)
CW=${CHUNK_WRITES:-$HERE/target/release/examples/chunk-writes}
[ -x "$CW" ] || (cd "$HERE" && cargo build --release -p blockvault --example chunk-writes)
W=$(mktemp -d /var/tmp/bv-store-bench.XXXXXX)
cleanup() { "$HERE/tests/ceph/stop-cluster.sh" "$W/ceph" >/dev/null 2>&1 || true; rm -rf "$W"; }
trap cleanup EXIT
trap "exit 143" TERM INT
# room for the RADOS store, the S3 store and rados bench's objects at once
BV_CEPH_MGR=0 BV_CEPH_BACKEND=bluestore BV_CEPH_OSD_GB=$(( SIZE * 4 / 1024 + 8 )) \
  "$HERE/tests/ceph/start-cluster.sh" "$W/ceph" > "$W/ceph.env" 2> "$W/ceph.log"
CONF="$W/ceph/ceph.conf"
# shellcheck disable=SC1091
eval "$("$HERE/tests/ceph/start-rgw.sh" "$W/ceph" 2>"$W/rgw.log")"
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
head -c "$((SIZE << 20))" /dev/urandom > "$W/img"
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>"$W/err" || { cat "$W/err" >&2; exit 1; }; e=$(date +%s.%N); echo "$e - $s" | bc; }
mibs() { echo "scale=1; $SIZE / $1" | bc; }
secs=$(( SIZE / 200 + 5 ))
for round in $(seq "$ROUNDS"); do
  for kind in dir rados s3; do
    rm -rf "$W/$kind"; mkdir -p "$W/$kind"
    case $kind in
      dir) store="path = \"$W/$kind/store\"";;
      rados) store="url = \"rados:rbd/bench$round\"
[store.ceph]
conf = \"$CONF\"";;
      s3) store="url = \"s3:$BV_S3_ENDPOINT/bench-$round\"";;
    esac
    printf '[store]\ngc-grace = 0\n%s\n[catalog]\npath = "%s"\n[[image]]\nname = "img"\nsource = "file:%s"\n' \
      "$store" "$W/$kind/catalog.sqlite" "$W/img" > "$W/$kind/config.toml"
    "$BIN" --config "$W/$kind/config.toml" -q init >/dev/null
    drop; b=$(t "$BIN" --config "$W/$kind/config.toml" -q --no-progress backup img)
    drop; r=$(t "$BIN" --config "$W/$kind/config.toml" -q --no-progress restore img --to "$W/out")
    cmp "$W/img" "$W/out"
    echo "round $round $kind store: backup ${b}s ($(mibs "$b") MiB/s), restore ${r}s ($(mibs "$r") MiB/s)"
    rm -f "$W/out"
    # free the space of this store before the next one
    case $kind in
      dir) rm -rf "$W/dir/store";;
      rados) rados -c "$CONF" -p rbd -N "bench$round/chunks" ls | xargs -r -n 64 rados -c "$CONF" -p rbd -N "bench$round/chunks" rm;;
      s3) "$BIN" --config "$W/$kind/config.toml" -q forget img --all --force >/dev/null 2>&1 \
            && "$BIN" --config "$W/$kind/config.toml" -q gc >/dev/null 2>&1 || true;;
    esac
  done
  # rados bench cleans up its objects at the end, chunk-writes too
  rados -c "$CONF" -p rbd bench "$secs" write -b 4194304 -t 16 2>/dev/null \
    | grep -E "^(Bandwidth \(MB/sec\)|Total time run)" | sed "s/^/round $round rados bench write 4M x16: /"
  "$CW" "$W/rados/config.toml" "rados:rbd/cw$round" "$(( SIZE / 4 ))" | sed "s/^/round $round RADOS backend chunk writes: /"
done
echo "($(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), image $SIZE MiB, $(basename "$BIN") $("$BIN" --version 2>/dev/null | head -1))"
