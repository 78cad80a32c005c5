#!/usr/bin/env bash
# bench/compare.sh OLD_BIN NEW_BIN IMAGE... -- blockvault against itself:
# for each image, alternating the two binaries, 2 rounds: a first backup into
# a fresh store, then an unchanged second backup, each after dropping the
# page cache (root). Prints wall/user/sys seconds and peak RSS (KiB).
set -euo pipefail
OLD=${1:?usage: compare.sh OLD_BIN NEW_BIN IMAGE...}; NEW=${2:?}; shift 2
W=$(mktemp -d /var/tmp/bv-compare.XXXXXX); trap 'rm -rf "$W"' EXIT
timed() { sync; echo 3 > /proc/sys/vm/drop_caches; /usr/bin/time -f "%e %U %S %M" -o "$W/t" "$@" >/dev/null 2>&1; cat "$W/t"; }
for round in 1 2; do
  for img in "$@"; do
    for bin in "$OLD" "$NEW"; do
      rm -rf "$W/s"; mkdir -p "$W/s"
      printf '[store]\npath = "%s/s/store"\n[[image]]\nname = "img"\nsource = "file:%s"\n' "$W" "$img" > "$W/s/config.toml"
      "$bin" --config "$W/s/config.toml" -q init >/dev/null
      first=$(timed "$bin" --config "$W/s/config.toml" -q --no-progress backup img)
      second=$(timed "$bin" --config "$W/s/config.toml" -q --no-progress backup img)
      echo "round $round $(basename "$img") $bin: first [$first] second [$second]"
    done
  done
done
