#!/usr/bin/env bash
# bench/serve.sh [BIN] [SIZE_MIB] -- reading a backup through `blockvault
# serve` with nbdcopy, next to `blockvault restore --to FILE` of the same
# backup. One image of SIZE_MIB (default 1024): half random data, a quarter
# base64 text (compressible, so zstd decodes it), a quarter holes; one backup
# with the default 4 MiB blocks.
# Then, alternating, ROUNDS (default 3) of each, after dropping the page
# cache when run as root:
#   restore:  blockvault restore img --to OUT
#   nbdcopy:  nbdcopy nbd://127.0.0.1:PORT/img OUT   (serve already running)
# Both outputs are compared with the image. Prints wall/user/sys seconds
# and peak RSS (KiB) per run; the server's CPU is not in nbdcopy's figures,
# so its user+sys over all nbdcopy runs is printed at the end.
# Needs libnbd-bin (nbdcopy) and /usr/bin/time; root to drop the page cache.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${1:-$HERE/../target/release/blockvault}
MIB=${2:-1024}
ROUNDS=${ROUNDS:-3}
[ -x "$BIN" ] || { echo "no blockvault binary at $BIN (cargo build --release -p blockvault)" >&2; exit 1; }
command -v nbdcopy >/dev/null || { echo "nbdcopy not found (apt-get install libnbd-bin)" >&2; exit 1; }
W=$(mktemp -d /var/tmp/bv-serve-bench.XXXXXX)
SRV=
cleanup() { [ -n "$SRV" ] && kill "$SRV" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT

drop() { sync; if [ "$(id -u)" = 0 ]; then echo 3 > /proc/sys/vm/drop_caches; fi; }
timed() { drop; /usr/bin/time -f "%e %U %S %M" -o "$W/t" "$@" >/dev/null 2>"$W/err" || { cat "$W/err" >&2; exit 1; }; cat "$W/t"; }

q=$((MIB / 4))
img=$W/img.raw
truncate -s "${MIB}M" "$img"
dd if=/dev/urandom of="$img" bs=1M count=$((2 * q)) conv=notrunc status=none
head -c $((q << 20)) < <(base64 -w 0 /dev/urandom) | dd of="$img" bs=1M seek=$((2 * q)) conv=notrunc iflag=fullblock status=none
printf '[store]\npath = "%s/store"\n[[image]]\nname = "img"\nsource = "file:%s"\n' "$W" "$img" > "$W/config.toml"
bv() { "$BIN" --config "$W/config.toml" -q --no-progress "$@"; }
bv init >/dev/null
bv backup img >/dev/null

"$BIN" --config "$W/config.toml" -q serve img --listen 127.0.0.1:0 > "$W/serve.out" 2> "$W/serve.err" &
SRV=$!
for _ in $(seq 100); do grep -q "^export" "$W/serve.out" 2>/dev/null && break; sleep 0.1; done
PORT=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$W/serve.out")
[ -n "$PORT" ] || { cat "$W/serve.err" >&2; exit 1; }
cpu0=$(awk '{print $14 + $15}' "/proc/$SRV/stat")

echo "image ${MIB} MiB (1/2 random, 1/4 base64, 1/4 holes), load $(cut -d' ' -f1-3 /proc/loadavg), nbdcopy $(nbdcopy --version | head -1)"
echo "run       wall user sys maxrss_kib"
for r in $(seq "$ROUNDS"); do
  rm -f "$W/out-r"; echo "restore $r  $(timed "$BIN" --config "$W/config.toml" -q --no-progress restore img --to "$W/out-r")"
  cmp "$W/out-r" "$img"
  rm -f "$W/out-n"; echo "nbdcopy $r  $(timed nbdcopy "nbd://127.0.0.1:$PORT/img" "$W/out-n")"
  cmp "$W/out-n" "$img"
done
cpu1=$(awk '{print $14 + $15}' "/proc/$SRV/stat")
echo "server CPU over the $ROUNDS nbdcopy runs: $(( (cpu1 - cpu0) * 10 )) ms (user+sys)"
