#!/usr/bin/python3
"""Drives writes, discards, resizes and snapshots on an RBD image for the
integration tests, through Ceph's own python bindings (python3-rbd).

Usage: rbd_io.py POOL IMAGE < ops.json, where ops.json is a list of
  ["write", offset, length, seed]   deterministic pseudo-random bytes
  ["fill", offset, length, byte]    one byte repeated
  ["discard", offset, length]
  ["resize", size]
  ["snap", name]
  ["create", size, order, features, stripe_unit, stripe_count]   (0 = default)
Connects with CEPH_CONF.
"""
import json
import os
import random
import sys

import rados
import rbd

STEP = 4 << 20  # one write call per 4 MiB: huge single writes are refused


def main():
    pool, name = sys.argv[1], sys.argv[2]
    ops = json.load(sys.stdin)
    cluster = rados.Rados(conffile=os.environ["CEPH_CONF"])
    cluster.connect(timeout=30)
    try:
        ioctx = cluster.open_ioctx(pool)
        try:
            run(ioctx, name, ops)
        finally:
            ioctx.close()
    finally:
        cluster.shutdown()


def write(image, data, off):
    for i in range(0, len(data), STEP):
        image.write(data[i:i + STEP], off + i)


def run(ioctx, name, ops):
    image = None
    try:
        for op in ops:
            kind = op[0]
            if kind == "create":
                size, order, features, su, sc = op[1:]
                kw = {"old_format": False, "features": features}
                if order:
                    kw["order"] = order
                if su:
                    kw["stripe_unit"], kw["stripe_count"] = su, sc
                rbd.RBD().create(ioctx, name, size, **kw)
                continue
            if image is None:
                image = rbd.Image(ioctx, name)
            if kind == "write":
                off, length, seed = op[1:]
                rng = random.Random(seed)
                for i in range(0, length, STEP):
                    image.write(rng.randbytes(min(STEP, length - i)), off + i)
            elif kind == "fill":
                off, length, byte = op[1:]
                write(image, bytes([byte]) * length, off)
            elif kind == "discard":
                image.discard(op[1], op[2])
            elif kind == "resize":
                image.resize(op[1])
            elif kind == "snap":
                image.create_snap(op[1])
            else:
                raise SystemExit("unknown op %r" % (kind,))
        if image is not None:
            image.flush()
    finally:
        # an Image still open after cluster.shutdown() hangs the interpreter's exit
        if image is not None:
            image.close()


if __name__ == "__main__":
    main()
