#!/usr/bin/env bash
# bench/rbd-incr.sh IMAGE_GIB CHANGE_MIB REPS [fill|sparse] -- issue 13: one RBD incremental
# of CHANGE_MIB of random 64 KiB writes (random data, so nothing deduplicates or
# compresses) against the home-grown script flow, interleaved in each repetition:
#   script: rbd snap create; rbd export-diff --from-snap PREV ... > /dev/null; rbd snap rm PREV
#   zstd:   the same, piped to zstd -1 > file
#   bv-SIZE: blockvault backup at each block size of BLOCK_SIZES (default
#            "4M 64K"; below 4M the block map is indexed)
# Needs CEPH_CONF (tests/ceph/start-cluster.sh DIR) and BV (the blockvault binary,
# default target/release/blockvault); BVS="old=PATH new=PATH" runs several
# binaries instead, each into its own stores, one after the other in every
# repetition (steps old-SIZE, new-SIZE); an entry NAME=PATH@DIR keeps that
# step's store and catalog under DIR (e.g. /dev/shm: a tmpfs, to see what
# writing the chunks to this machine's disk costs). Prints wall seconds and MiB read from the OSD
# (osd.op_r_out_bytes of `ceph daemon osd.0 perf dump`) per step and repetition.
# Rep 0 is each block size's first (full) backup; rep REPS+1 (rst-SIZE) restores
# its last backup to a file after dropping the page cache (root; RESTORE=0 skips it).
set -euo pipefail
GIB=${1:?usage: rbd-incr.sh IMAGE_GIB CHANGE_MIB REPS [fill|sparse]}; MIB=${2:?}; REPS=${3:?}; MODE=${4:-fill}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BV=${BV:-$HERE/../target/release/blockvault}
W=$(mktemp -d /var/tmp/bv-rbdincr.XXXXXX)
IMG=bvincr-$$
ELSEWHERE=() # store directories outside $W
cleanup() { rbd snap purge rbd/$IMG >/dev/null 2>&1 || true; rbd rm --no-progress rbd/$IMG >/dev/null 2>&1 || true; rm -rf "$W" "${ELSEWHERE[@]}"; }
trap cleanup EXIT
osd_read() { ceph daemon osd.0 perf dump | python3 -c 'import json,sys; print(json.load(sys.stdin)["osd"]["op_r_out_bytes"])'; }
F="--image-feature layering,exclusive-lock,object-map,fast-diff"
if [[ $MODE == fill ]]; then
  head -c $((GIB << 30)) /dev/urandom | rbd import --no-progress $F - rbd/$IMG >/dev/null
else
  rbd create --size ${GIB}G $F rbd/$IMG
fi
BLOCK_SIZES=${BLOCK_SIZES:-4M 64K}
BVS=${BVS:-bv=$BV}
step() { # name command...
  local r0 r1 t0 t1; r0=$(osd_read); t0=$(date +%s.%N); "${@:2}" >/dev/null 2>&1; t1=$(date +%s.%N); r1=$(osd_read)
  printf '%s rep %d %-7s wall %6.2f s  read %7.1f MiB\n' "$GIB GiB/$MIB MiB" "$rep" "$1" "$(echo "$t1 - $t0" | bc)" "$(echo "($r1 - $r0) / 1048576" | bc -l)"
}
rep=0 # the first (full) backups
for nb in $BVS; do for bs in $BLOCK_SIZES; do
  n=${nb%%=*}; b=${nb#*=}; mkdir -p "$W/$n-$bs"; at=$W
  if [[ $b == *@* ]]; then at=${b#*@}/bvincr-$$; b=${b%%@*}; mkdir -p "$at/$n-$bs"; ELSEWHERE+=("$at"); fi
  printf '[store]\npath = "%s/%s/store"\n[catalog]\npath = "%s/%s/cat.sqlite"\n[[image]]\nname = "d"\nsource = "rbd:rbd/%s"\nblock-size = "%s"\n' \
    "$at" "$n-$bs" "$at" "$n-$bs" "$IMG" "$bs" > "$W/$n-$bs/c.toml"
  "$b" --config "$W/$n-$bs/c.toml" -q init >/dev/null
  step "$n-$bs" "$b" --config "$W/$n-$bs/c.toml" -q --no-progress backup d
done; done
rbd snap create rbd/$IMG@s0; rbd snap create rbd/$IMG@z0
for rep in $(seq 1 "$REPS"); do
  /usr/bin/python3 -c "
import os,random,rados,rbd
c=rados.Rados(conffile=os.environ['CEPH_CONF']); c.connect(); io=c.open_ioctx('rbd'); im=rbd.Image(io,'$IMG')
n=$MIB*16; blocks=($GIB<<30)//65536
for b in random.sample(range(blocks), n): im.write(os.urandom(65536), b*65536)
im.flush(); im.close(); io.close(); c.shutdown()"
  p=$((rep - 1))
  step script bash -c "rbd snap create rbd/$IMG@s$rep && rbd export-diff --no-progress --from-snap s$p rbd/$IMG@s$rep - > /dev/null && rbd snap rm --no-progress rbd/$IMG@s$p"
  order=$BVS; (( rep % 2 == 0 )) && order=$(printf '%s\n' $BVS | tac | tr '\n' ' ') # alternated: no binary always follows the script
  for nb in $order; do for bs in $BLOCK_SIZES; do
    n=${nb%%=*}; b=${nb#*=}; b=${b%%@*}; step "$n-$bs" "$b" --config "$W/$n-$bs/c.toml" -q --no-progress backup d
  done; done
  step zstd bash -c "rbd snap create rbd/$IMG@z$rep && rbd export-diff --no-progress --from-snap z$p rbd/$IMG@z$rep - | zstd -1 -q > $W/diff.zst && rbd snap rm --no-progress rbd/$IMG@z$p"
done
# restore the last backup of each block size to a file (page cache dropped first)
rep=$((REPS + 1))
[[ ${RESTORE:-1} == 0 ]] && BLOCK_SIZES=
for nb in $BVS; do for bs in $BLOCK_SIZES; do
  n=${nb%%=*}; b=${nb#*=}; b=${b%%@*}
  sync; echo 3 > /proc/sys/vm/drop_caches
  step "rst-$n-$bs" "$b" --config "$W/$n-$bs/c.toml" -q --no-progress restore d --to "$W/restored.img" --force
  rm -f "$W/restored.img"
done; done
echo "load: $(uptime)"
