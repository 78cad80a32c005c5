#!/usr/bin/python3
"""A writer for the group test: stamps one sequence number into several RBD
images, in turn, over and over, as an application writing to the disks of
one VM would. Between two rounds (never inside one) it honours a pause
flag, as a frozen filesystem would block it: while FLAG exists it flushes,
copies FLAG's content (a token the pre hook chose) to ACK, and waits (a
new token while paused is acknowledged too); when FLAG is gone it goes on.

Usage: group_writer.py POOL FLAG ACK STOP IMAGE...   (CEPH_CONF for the cluster)
Each round n writes a 4 KiB block "seq=<n>" padded with the byte n % 251 at
offset 0 and at offset 1 MiB + 512 of every image. Runs until STOP exists;
prints the last sequence number.
"""
import os
import sys
import time

import rados
import rbd


def block(seq):
    head = ("seq=%020d\n" % seq).encode()
    return head + bytes([seq % 251]) * (4096 - len(head))


def main():
    pool, flag, ack, stop = sys.argv[1:5]
    names = sys.argv[5:]
    cluster = rados.Rados(conffile=os.environ["CEPH_CONF"])
    cluster.connect(timeout=30)
    ioctx = cluster.open_ioctx(pool)
    images = [rbd.Image(ioctx, n) for n in names]
    seq = 0
    try:
        while not os.path.exists(stop):
            if os.path.exists(flag):
                for img in images:
                    img.flush()
                acked = None
                while not os.path.exists(stop):
                    try:
                        with open(flag) as f:
                            token = f.read()
                    except FileNotFoundError:
                        break
                    if token and token != acked:
                        with open(ack + ".tmp", "w") as f:
                            f.write(token)
                        os.rename(ack + ".tmp", ack)
                        acked = token
                    time.sleep(0.01)
                continue
            seq += 1
            b = block(seq)
            for img in images:
                img.write(b, 0)
                img.write(b, (1 << 20) + 512)
        print(seq)
    finally:
        for img in images:
            img.close()
        ioctx.close()
        cluster.shutdown()


if __name__ == "__main__":
    main()
