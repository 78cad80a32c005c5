#!/usr/bin/env bash
# bench/crypt.sh [BIN] [SIZE_MIB] -- encryption at rest (issue 15): the same
# binary backs up and restores the same images into an unencrypted and an
# encrypted store, alternating, 2 rounds:
#   random   SIZE_MIB MiB of random data: first backup, then restore;
#   ext4     a 2 GiB ext4 image (mkfs.ext4 -d /usr/share) backed up, then a
#            "day 2" copy of it (files added with debugfs) backed up
#            incrementally into the same store and restored.
# Caches are warm (no root needed); prints wall, user and sys seconds per
# step and the encrypted/plain ratio of the wall and CPU totals. On a
# shared machine wall times are noisy: compare user+sys too.
set -euo pipefail
BIN=${1:-target/release/blockvault}; MIB=${2:-1024}
BIN=$(realpath "$BIN")
W=$(mktemp -d /var/tmp/bv-crypt.XXXXXX); trap 'rm -rf "$W"' EXIT
log() { printf '[crypt %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

log "making $MIB MiB random image and the ext4 day-1/day-2 images"
head -c $((MIB << 20)) /dev/urandom > "$W/random.img"
truncate -s 2G "$W/base.img"
mkfs.ext4 -q -F -d /usr/share "$W/base.img"
cp --sparse=always "$W/base.img" "$W/day2.img"
mkdir -p "$W/add"; i=0
for f in /usr/bin/*; do
  [[ -f $f && ! -L $f ]] || continue
  cp "$f" "$W/add/"; i=$((i+1)); ((i < 200)) || break
done
{ echo "mkdir /day2"; for f in "$W"/add/*; do echo "write $f /day2/$(basename "$f")"; done; } > "$W/debugfs.cmds"
debugfs -w -f "$W/debugfs.cmds" "$W/day2.img" >/dev/null 2>&1
log "day2 adds $(du -sh "$W/add" | cut -f1) in $i files"

# timed NAME CMD...: appends "NAME wall user sys" to $W/times
timed() { local n=$1; shift; /usr/bin/time -f "%e %U %S" -o "$W/t" "$@" >/dev/null 2>"$W/err" || { cat "$W/err" >&2; exit 1; }; echo "$n $(cat "$W/t")" >> "$W/times"; }

run_mode() { # MODE (plain|enc) ROUND
  local m=$1 r=$2 d="$W/$1-$2"
  rm -rf "$d"; mkdir -p "$d"
  local key=""; [[ $m == enc ]] && key="key-file = \"$d/key\""
  printf '[store]\npath = "%s/store"\n%s\n[catalog]\npath = "%s/cat.sqlite"\n[[image]]\nname = "random"\nsource = "file:%s/random.img"\n[[image]]\nname = "ext4"\nsource = "file:%s/ext4.img"\n' \
    "$d" "$key" "$d" "$W" "$d" > "$d/config.toml"
  local bv=("$BIN" --config "$d/config.toml" -q --no-progress)
  local flag=""; [[ $m == enc ]] && flag="--encrypt"
  "${bv[@]}" init $flag >/dev/null
  timed "$m random-backup" "${bv[@]}" backup random
  timed "$m random-restore" "${bv[@]}" restore random --to "$d/random.out"
  cmp "$W/random.img" "$d/random.out"; rm "$d/random.out"
  cp --sparse=always "$W/base.img" "$d/ext4.img"
  timed "$m ext4-day1-backup" "${bv[@]}" backup ext4
  cp --sparse=always "$W/day2.img" "$d/ext4.img"
  timed "$m ext4-day2-backup" "${bv[@]}" backup ext4
  timed "$m ext4-day2-restore" "${bv[@]}" restore ext4 --to "$d/ext4.out"
  cmp "$W/day2.img" "$d/ext4.out"
  rm -rf "$d"
}

: > "$W/times"
sync # the images just written: their writeback is not charged to the first timed step
for round in 1 2; do
  if ((round == 1)); then run_mode plain $round; run_mode enc $round; else run_mode enc $round; run_mode plain $round; fi
done
echo "# $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $MIB MiB images, $BIN"
echo "# step: wall user sys (seconds), per round"
sort -k1,2 -s "$W/times" | awk '{printf "%-6s %-18s %7.2f %7.2f %7.2f\n", $1, $2, $3, $4, $5}'
awk '{w[$1]+=$3; c[$1]+=$4+$5} END {printf "# totals: plain wall %.2f cpu %.2f | enc wall %.2f cpu %.2f | ratio wall %.3f cpu %.3f\n", w["plain"], c["plain"], w["enc"], c["enc"], w["enc"]/w["plain"], c["enc"]/c["plain"]}' "$W/times"
