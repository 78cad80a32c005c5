#!/usr/bin/env bash
# bench/exportdiff.sh [IMAGE_MIB] [WRITES] -- blockvault export-diff / import-diff
# next to rbd export-diff / import-diff of the same change, on a throwaway
# memstore cluster (tests/ceph/start-cluster.sh). An image of IMAGE_MIB
# (default 512) with half of it written, backed up, then WRITES (default 300)
# random 64 KiB writes, backed up again; then each tool's stream of that
# change: seconds (wall, /usr/bin/time) and bytes. Needs a release build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MIB=${1:-512}; WRITES=${2:-300}
BIN=${BV_BIN:-target/release/blockvault}
W=$(mktemp -d); trap 'tests/ceph/stop-cluster.sh "$W/ceph" >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
eval "$(BV_CEPH_MGR=0 tests/ceph/start-cluster.sh "$W/ceph")"
cat >"$W/c.toml" <<EOC
[store]
path = "$W/store"
[[image]]
name = "vm"
source = "rbd:rbd/bench"
[[image]]
name = "imp"
source = "rbd:rbd/bench"
EOC
bv() { "$BIN" --config "$W/c.toml" --no-progress -q "$@"; }
t() { local what=$1; shift; /usr/bin/time -f "$what %e s" "$@"; }
rbd create --size "${MIB}M" rbd/bench
/usr/bin/python3 - "$MIB" "$WRITES" <<'EOP'
import os, random, sys, rados, rbd
mib, writes = int(sys.argv[1]), int(sys.argv[2])
c = rados.Rados(conffile=os.environ["CEPH_CONF"]); c.connect()
io = c.open_ioctx("rbd"); img = rbd.Image(io, "bench"); r = random.Random(1)
for off in range(0, mib // 2 << 20, 4 << 20): img.write(r.randbytes(4 << 20), off)
img.create_snap("s1")
for _ in range(writes): img.write(r.randbytes(65536), r.randrange(0, (mib << 20) - 65536))
img.create_snap("s2"); img.close(); io.close(); c.shutdown()
EOP
bv init
rbd export-diff --no-progress rbd/bench@s1 "$W/full.rbd"
rbd export-diff --no-progress --from-snap s1 rbd/bench@s2 "$W/inc.rbd"
bv import-diff vm "$W/full.rbd"
t "blockvault import-diff (rbd's stream s1..s2):" "$BIN" --config "$W/c.toml" --no-progress -q import-diff vm "$W/inc.rbd"
t "rbd export-diff --from-snap s1 bench@s2:" rbd export-diff --no-progress --from-snap s1 rbd/bench@s2 "$W/inc2.rbd"
t "blockvault export-diff vm@2 --from 1:" "$BIN" --config "$W/c.toml" --no-progress -q export-diff vm@2 --from 1 -o "$W/inc.bv"
echo "stream bytes: rbd $(stat -c %s "$W/inc.rbd"), blockvault $(stat -c %s "$W/inc.bv")"
rbd create --size 1M rbd/r1; rbd import-diff --no-progress "$W/full.rbd" rbd/r1
rbd create --size 1M rbd/r2; rbd import-diff --no-progress "$W/full.rbd" rbd/r2
t "rbd import-diff (rbd's stream):" rbd import-diff --no-progress "$W/inc.rbd" rbd/r1
t "rbd import-diff (blockvault's stream):" rbd import-diff --no-progress "$W/inc.bv" rbd/r2
a=$(rbd export --no-progress rbd/r2 - | sha256sum); b=$(rbd export --no-progress rbd/bench@s2 - | sha256sum)
[ "$a" = "$b" ] && echo "replica from blockvault's stream equals bench@s2" || { echo "MISMATCH"; exit 1; }
