#!/usr/bin/env bash
# bench/run.sh [--smoke] [--reps N] [--tools a,b] [--no-build] [--no-rbd] [--ceph] [--out FILE]
#
# blockvault vs restic, borg, Benji (and rbd export-diff when a Ceph cluster is
# reachable through CEPH_CONF) on the same data. Builds/caches the data under
# bench/cache/, installs missing tools, writes bench/results.md (--smoke:
# bench/out/results-smoke.md). See bench/README.md. Needs root.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=/usr/bin/python3
[[ -x $PY ]] || PY=$(command -v python3)
BENCH_CMD="bench/run.sh${*:+ $*}"
export BENCH_CMD
exec "$PY" "$HERE/bench.py" "$@"
