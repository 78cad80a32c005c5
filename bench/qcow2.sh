#!/usr/bin/env bash
# bench/qcow2.sh [SIZE_MIB] -- `restore --to qcow2:` next to its peer, the raw
# restore followed by `qemu-img convert -O qcow2`, on one image of SIZE_MIB
# (default 1536): 1/3 random, 1/3 text (compressible, and the kind of data
# that has zero pages inside blocks), 1/3 holes. 64 KiB blocks (so 64 KiB
# clusters on both sides), 2 rounds, alternating, page cache dropped before
# each timed command when run as root. Then a 5-backup chain (~2% of the
# blocks rewritten between backups): `restore --chain` time and layer sizes.
# Prints wall/user/sys seconds, peak RSS (KiB) and file sizes, and checks
# every output with qemu-img compare / check.
#
#   BLOCKVAULT=target/release/blockvault bench/qcow2.sh 1536
set -euo pipefail
SIZE_MIB=${1:-1536}
BV=${BLOCKVAULT:-target/release/blockvault}
[[ -x $BV ]] || { echo "no $BV: cargo build --release -p blockvault (or set BLOCKVAULT)" >&2; exit 1; }
BV=$(realpath "$BV")
W=$(mktemp -d /var/tmp/bv-qcow2.XXXXXX); trap 'rm -rf "$W"' EXIT
drop() { sync; if [[ $(id -u) == 0 ]]; then echo 3 > /proc/sys/vm/drop_caches; fi; }
timed() { drop; /usr/bin/time -f "%e %U %S %M" -o "$W/t" "$@" >/dev/null 2>"$W/err" || { cat "$W/err" >&2; exit 1; }; cat "$W/t"; }
bv() { "$BV" --config "$W/config.toml" -q --no-progress "$@"; }

third=$((SIZE_MIB / 3))
img=$W/disk.img
truncate -s "${SIZE_MIB}M" "$img"
head -c "${third}M" /dev/urandom | dd of="$img" conv=notrunc status=none
# text: base64 of random bytes, with a 4 KiB zero page every 64 KiB... no:
# every 48 KiB, so zero pages fall inside clusters, never a whole one
python3 - "$img" "$third" <<'EOF'
import base64, os, sys
path, mib = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    f.seek(mib << 20)
    left = mib << 20
    while left > 0:
        piece = base64.b64encode(os.urandom(33 * 1024))[: 44 * 1024] + bytes(4096)
        f.write(piece[: min(len(piece), left)])
        left -= len(piece)
EOF
printf '[store]\npath = "%s/store"\n[catalog]\npath = "%s/catalog.sqlite"\n[defaults]\nblock-size = "64K"\n[[image]]\nname = "disk"\nsource = "file:%s"\n' "$W" "$W" "$img" > "$W/config.toml"
bv init >/dev/null
bv backup disk >/dev/null
echo "image: ${SIZE_MIB} MiB ($third MiB random, $third MiB text with zero pages, the rest holes), 64 KiB blocks; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "blockvault: $BV; $(qemu-img --version | head -1)"
for round in 1 2; do
  rm -f "$W/bv.qcow2" "$W/raw.img" "$W/conv.qcow2"
  t_bv=$(timed "$BV" --config "$W/config.toml" -q --no-progress restore disk --to "qcow2:$W/bv.qcow2")
  t_raw=$(timed "$BV" --config "$W/config.toml" -q --no-progress restore disk --to "$W/raw.img")
  t_conv=$(timed qemu-img convert -O qcow2 -f raw "$W/raw.img" "$W/conv.qcow2")
  echo "round $round: blockvault restore --to qcow2: [$t_bv]  restore --to raw: [$t_raw]  qemu-img convert -O qcow2 of it: [$t_conv]   (wall user sys s, peak RSS KiB)"
done
qemu-img check -q "$W/bv.qcow2"
qemu-img compare -q -f qcow2 -F raw "$W/bv.qcow2" "$W/raw.img"
qemu-img compare -q "$W/bv.qcow2" "$W/conv.qcow2"
echo "sizes (bytes, apparent / allocated): blockvault $(stat -c %s "$W/bv.qcow2") / $(du -B1 "$W/bv.qcow2" | cut -f1); qemu-img convert $(stat -c %s "$W/conv.qcow2") / $(du -B1 "$W/conv.qcow2" | cut -f1)"

# a chain of 5 backups
blocks=$((SIZE_MIB * 16))
for n in 2 3 4 5; do
  python3 - "$img" "$blocks" "$n" <<'EOF'
import os, random, sys
path, blocks, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
with open(path, "r+b") as f:
    for b in r.sample(range(blocks), blocks // 50):
        f.seek(b * 65536 + r.randrange(0, 60000))
        f.write(os.urandom(4096) if r.random() < 0.8 else bytes(4096))
EOF
  bv backup disk >/dev/null
done
rm -f "$W"/chain*.qcow2 "$W/raw.img"
t_chain=$(timed "$BV" --config "$W/config.toml" -q --no-progress restore disk --chain --to "qcow2:$W/chain.qcow2")
bv restore disk --to "$W/raw.img" >/dev/null
qemu-img compare -q -f qcow2 -F raw "$W/chain.qcow2" "$W/raw.img"
for f in "$W"/chain*.qcow2; do qemu-img check -q "$f"; done
echo "chain of 5: restore --chain [$t_chain]; layers (bytes): $(for f in "$W"/chain*.qcow2; do printf '%s=%s ' "$(basename "$f")" "$(stat -c %s "$f")"; done)"
