#!/usr/bin/env bash
# demo.sh -- blockvault's main job on the embedded default (no Ceph needed):
# build, make a sample ext4 disk image, back it up, change it, back it up
# again, restore both backups and compare them with what was backed up.
# Everything lives in ./demo (removed and recreated on each run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$(pwd)
D=$ROOT/demo
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

command -v mkfs.ext4 >/dev/null || { echo "demo.sh needs mkfs.ext4 (apt-get install e2fsprogs)" >&2; exit 1; }
step "building blockvault (release)"
cargo build --release --locked -p blockvault
BV=$ROOT/target/release/blockvault

rm -rf "$D"; mkdir -p "$D/tree"
step "making a 256 MiB ext4 image from a directory tree"
cp -r "$ROOT/agent" "$ROOT/store" "$ROOT/catalog" "$D/tree/"
head -c 24M /dev/urandom > "$D/tree/random.bin"
mkfs.ext4 -q -F -d "$D/tree" "$D/disk.img" 256M
cp --sparse=always "$D/disk.img" "$D/day1.img"

cat > "$D/config.toml" <<TOML
[store]
path = "$D/store"

[[image]]
name = "disk"
source = "file:$D/disk.img"
TOML
export BLOCKVAULT_CONFIG=$D/config.toml

step "blockvault init"
"$BV" init
step "first backup"
"$BV" backup disk

step "changing the image (new files written into the filesystem with debugfs)"
head -c 8M /dev/urandom > "$D/new.bin"
debugfs -w -R "write $D/new.bin day2.bin" "$D/disk.img" >/dev/null 2>&1
cp --sparse=always "$D/disk.img" "$D/day2.img"

step "second backup (only new chunks are stored)"
"$BV" backup disk
"$BV" list

step "restoring both backups and comparing"
ids=$("$BV" list disk --json | python3 -c 'import json,sys; print(" ".join(str(b["id"]) for b in json.load(sys.stdin)))')
set -- $ids
"$BV" restore "disk@$1" --to "$D/restored1.img"
"$BV" restore "disk@$2" --to "$D/restored2.img"
cmp "$D/day1.img" "$D/restored1.img"
cmp "$D/day2.img" "$D/restored2.img"
e2fsck -fn "$D/restored2.img" >/dev/null
echo
echo "OK: both backups restore bit-identically, and the restored filesystem passes e2fsck."
du -sh --apparent-size "$D/disk.img" | sed 's/\t.*/ image (apparent size)/'
du -sh "$D/store/chunks" | sed 's/\t.*/ in the store for both backups/'
