#!/usr/bin/env bash
# tests/run.sh -- run every blockvault test on this machine, the way CI does.
#
# Installs what a fresh Debian machine lacks (Ceph's packages for the test
# cluster, e2fsprogs, systemd-analyze for the unit checks), builds the
# workspace, starts a throwaway single-node Ceph cluster (tests/ceph/), runs
# `cargo test --workspace` against it, checks the packaging, and stops the
# cluster. Exits non-zero on any failure.
#
#   BV_SKIP_PACKAGING=1   skip packaging/check.sh (the .deb build and install)
#   BV_FUZZ_SECONDS=N     fuzz each target N s (default 45; 0 skips fuzz/run.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

log() { echo "[tests/run.sh $(date +%T)] $*" >&2; }

# ---- packages a fresh machine lacks
need=()
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v nbdcopy >/dev/null || need+=(libnbd-bin)   # nbdinfo, nbdcopy: tests/integration/serve.rs
command -v chattr >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi
tests/ceph/install-deps.sh

# ---- build first, so the cluster isn't kept waiting on the compiler
log "building"
cargo build --workspace --all-targets --locked

# ---- a throwaway Ceph cluster for the RBD tests
CEPH_DIR=$(mktemp -d /tmp/bv-ceph.XXXXXX)
cleanup() { tests/ceph/stop-cluster.sh "$CEPH_DIR" >/dev/null 2>&1 || true; }
trap cleanup EXIT
log "starting Ceph test cluster in $CEPH_DIR"
eval "$(tests/ceph/start-cluster.sh "$CEPH_DIR")"
export CEPH_CONF
log "cluster up: CEPH_CONF=$CEPH_CONF"

log "cargo test"
cargo test --workspace --locked -- --test-threads="${BV_TEST_THREADS:-2}"

# ---- fuzz targets (fuzz/, its own workspace), a bounded time each
if [ "${BV_FUZZ_SECONDS:-45}" != 0 ]; then
  log "fuzzing, ${BV_FUZZ_SECONDS:-45} s per target"
  fuzz/run.sh "${BV_FUZZ_SECONDS:-45}"
fi

if [ "${BV_SKIP_PACKAGING:-0}" != 1 ] && [ -x packaging/check.sh ]; then
  log "packaging checks"
  packaging/check.sh
fi
log "all tests passed"
