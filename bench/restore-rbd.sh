#!/usr/bin/env bash
# bench/restore-rbd.sh [SIZE_MIB] -- `blockvault restore --to rbd:` next to
# `rbd import` of the same raw image, on a throwaway cluster
# (tests/ceph/start-cluster.sh; memstore by default, BV_CEPH_BACKEND=bluestore
# for a sparse-file bluestore OSD). One image of SIZE_MIB (default 1024):
# 1/4 random, 1/4 base64 text, 1/4 text with a 4 KiB zero page every
# 48 KiB (zero pages inside blocks, as a filesystem's free space has),
# 1/4 holes; one backup with the default 4 MiB blocks, store on local disk.
# Then ROUNDS (default 3) of each, alternating, each into a new image that is
# removed afterwards, page cache dropped before each run when root:
#   rbd import:  rbd import --no-progress --sparse-size S IMG rbd/imp
#   restore:     blockvault restore img --to rbd:rbd/bv --sparse-size S
# for each hole granularity S of SPARSE (default "4096 65536": rbd's default,
# then 64 KiB). Every restored image is compared with the raw image
# (rbd export | cmp). Prints wall/user/sys seconds and peak RSS (KiB) per
# run, the OSD's CPU seconds during it, and the load. A memstore OSD keeps
# every byte ever written in RAM: give it BV_CEPH_OSD_GB (default here
# 3 + 1.5 per run and GiB).
#
#   BLOCKVAULT=target/release/blockvault ROUNDS=3 bench/restore-rbd.sh 1024
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MIB=${1:-1024}
ROUNDS=${ROUNDS:-3}
BV=${BLOCKVAULT:-target/release/blockvault}
[[ -x $BV ]] || { echo "no $BV: cargo build --release -p blockvault (or set BLOCKVAULT)" >&2; exit 1; }
BV=$(realpath "$BV")
W=$(mktemp -d /var/tmp/bv-restore-rbd.XXXXXX)
trap 'tests/ceph/stop-cluster.sh "$W/ceph" >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
SPARSE=${SPARSE:-4096 65536}
nsparse=$(wc -w <<<"$SPARSE")
export BV_CEPH_OSD_GB=${BV_CEPH_OSD_GB:-$((3 + (3 * ROUNDS * nsparse * 2 * MIB / 1024 + 1) / 2))}
eval "$(BV_CEPH_MGR=0 tests/ceph/start-cluster.sh "$W/ceph")"
drop() { sync; if [[ $(id -u) == 0 ]]; then echo 3 > /proc/sys/vm/drop_caches; fi; }
osd_cpu() { awk '{print $14 + $15}' "/proc/$(cat "$W/ceph/run/osd.0.pid")/stat"; }
timed() {
  drop
  local a b
  a=$(osd_cpu)
  /usr/bin/time -f "%e %U %S %M" -o "$W/t" "$@" >/dev/null 2>"$W/err" || { cat "$W/err" >&2; exit 1; }
  b=$(osd_cpu)
  echo "$(cat "$W/t") osd $(awk -v a="$a" -v b="$b" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", (b - a) / hz}')"
}

q=$((MIB / 4))
img=$W/img.raw
truncate -s "${MIB}M" "$img"
dd if=/dev/urandom of="$img" bs=1M count=$q conv=notrunc status=none
python3 - "$img" "$q" <<'EOF'
import base64, os, sys
path, q = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    f.seek(q << 20)
    f.write(base64.b64encode(os.urandom((q << 20) * 3 // 4))[: q << 20])
    left = q << 20
    while left > 0:
        piece = base64.b64encode(os.urandom(33 * 1024))[: 44 * 1024] + bytes(4096)
        f.write(piece[: min(len(piece), left)])
        left -= len(piece)
EOF
printf '[store]\npath = "%s/store"\n[catalog]\npath = "%s/catalog.sqlite"\n[[image]]\nname = "img"\nsource = "file:%s"\n' "$W" "$W" "$img" > "$W/config.toml"
bv() { "$BV" --config "$W/config.toml" -q --no-progress "$@"; }
bv init >/dev/null
bv backup img >/dev/null

echo "image ${MIB} MiB (1/4 random, 1/4 text, 1/4 text with zero pages, 1/4 holes), 4 MiB blocks; ${BV_CEPH_BACKEND:-memstore} OSD; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "blockvault: $BV; $(rbd --version)"
echo "run               wall user sys maxrss_kib osd_cpu_s"
check() { rbd export --no-progress "rbd/$1" - | cmp - "$img"; rbd rm --no-progress "rbd/$1" >/dev/null; }
for r in $(seq "$ROUNDS"); do
  for s in $SPARSE; do
    printf '%-17s %s\n' "import $s $r" "$(timed rbd import --no-progress --sparse-size "$s" "$img" rbd/imp)"
    check imp
    printf '%-17s %s\n' "restore $s $r" "$(timed "$BV" --config "$W/config.toml" -q --no-progress restore img --to rbd:rbd/bv --sparse-size "$s")"
    check bv
  done
done
echo "load at the end $(cut -d' ' -f1-3 /proc/loadavg)"
