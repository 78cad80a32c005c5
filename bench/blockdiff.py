#!/usr/bin/env python3
"""Describe the cached benchmark images as JSON (stdout).

    blockdiff.py CACHE_DIR

For base.img vs day2.img: how many 4 MiB blocks differ. For every image:
apparent size, allocated bytes (st_blocks), and the build time recorded by
make-data.sh in NAME.seconds.
"""
import json
import os
import sys

BLOCK = 4 << 20


def block_diff(a, b):
    differ = total = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(BLOCK)
            y = fb.read(BLOCK)
            if not x and not y:
                break
            total += 1
            if x != y:
                differ += 1
    return differ, total


def main():
    cache = sys.argv[1]
    out = {"block_size": BLOCK, "images": {}}
    for name in ("base.img", "day2.img", "random.img", "sparse.img"):
        p = os.path.join(cache, name)
        if not os.path.exists(p):
            continue
        st = os.stat(p)
        info = {"size": st.st_size, "allocated": st.st_blocks * 512}
        sec = p + ".seconds"
        if os.path.exists(sec):
            with open(sec) as f:
                info["build_seconds"] = float(f.read().strip() or 0)
        out["images"][name] = info
    base, day2 = os.path.join(cache, "base.img"), os.path.join(cache, "day2.img")
    if os.path.exists(base) and os.path.exists(day2):
        d, t = block_diff(base, day2)
        out["day2_blocks_differ"] = d
        out["day2_blocks_total"] = t
    mirror = os.path.join(cache, "mirror.txt")
    if os.path.exists(mirror):
        with open(mirror) as f:
            out["mirror"] = f.read().strip()
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
