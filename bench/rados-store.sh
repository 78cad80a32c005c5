#!/usr/bin/env bash
# bench/rados-store.sh [SIZE_MIB] [BIN] -- the RADOS store next to the
# directory store, in one run on one machine: a throwaway cluster with a
# bluestore OSD (tests/ceph/start-cluster.sh), a random image of SIZE_MIB
# (default 1024), then for each store a first backup and a restore (wall
# seconds, MiB/s of the image), and `rados bench` 4 MiB writes (16 in flight,
# what a backup's chunk writes are) on the same pool for the chunk write
# throughput to compare with. Needs root (drops the page cache) and Ceph.
set -euo pipefail
SIZE=${1:-1024}
BIN=${2:-$(dirname "$0")/../target/release/blockvault}
HERE=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d /var/tmp/bv-rados-bench.XXXXXX)
cleanup() { "$HERE/tests/ceph/stop-cluster.sh" "$W/ceph" >/dev/null 2>&1 || true; rm -rf "$W"; }
trap cleanup EXIT
BV_CEPH_MGR=0 BV_CEPH_BACKEND=bluestore BV_CEPH_OSD_GB=$(( SIZE / 1024 * 4 + 8 )) \
  "$HERE/tests/ceph/start-cluster.sh" "$W/ceph" > "$W/ceph.env" 2> "$W/ceph.log"
CONF="$W/ceph/ceph.conf"
head -c "$((SIZE << 20))" /dev/urandom > "$W/img"
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }
mibs() { echo "scale=1; $SIZE / $1" | bc; }
for kind in dir rados; do
  mkdir -p "$W/$kind"
  if [ $kind = dir ]; then store="path = \"$W/$kind/store\""; else store="url = \"rados:rbd/bench\""; fi
  cat > "$W/$kind/config.toml" <<CFG
[store]
$store
[store.ceph]
conf = "$CONF"
[catalog]
path = "$W/$kind/catalog.sqlite"
[[image]]
name = "img"
source = "file:$W/img"
CFG
  [ $kind = dir ] && sed -i '/^\[store.ceph\]/,+1d' "$W/$kind/config.toml"
  "$BIN" --config "$W/$kind/config.toml" -q init >/dev/null
  drop; b=$(t "$BIN" --config "$W/$kind/config.toml" -q --no-progress backup img)
  drop; r=$(t "$BIN" --config "$W/$kind/config.toml" -q --no-progress restore img --to "$W/$kind/out")
  cmp "$W/img" "$W/$kind/out"
  echo "$kind store: backup ${b}s ($(mibs "$b") MiB/s), restore ${r}s ($(mibs "$r") MiB/s)"
  rm -f "$W/$kind/out"
done
secs=$(( SIZE / 200 + 5 ))
rados -c "$CONF" -p rbd bench "$secs" write -b 4194304 -t 16 --no-cleanup 2>/dev/null | grep -E "^(Bandwidth \(MB/sec\)|Total time run)" | sed 's/^/rados bench write 4M x16: /'
