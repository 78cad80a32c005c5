#!/usr/bin/env bash
# tests/ceph/start-rgw.sh DIR -- start radosgw (S3) on the test cluster that
# tests/ceph/start-cluster.sh DIR started, with one S3 user of fixed test keys.
#
# radosgw runs as client.rgw.test with everything inside DIR (DIR/rgw, DIR/log/rgw.log,
# DIR/run/rgw.pid, DIR/run/rgw.asok); tests/ceph/stop-cluster.sh DIR stops it first, and
# tests/ceph/stop-rgw.sh DIR stops only it (a test that takes S3 away mid-backup); running
# this script again restarts it on the same port.  Prints, and writes to DIR/rgw.env:
#   export BV_S3_ENDPOINT=http://127.0.0.1:PORT
#   export AWS_ACCESS_KEY_ID=...  AWS_SECRET_ACCESS_KEY=...
# Use a bluestore OSD (BV_CEPH_BACKEND=bluestore) for stores: memstore keeps every byte in RAM.
#
# Environment: BV_RGW_PORT fixed port (default: first free one in 19300-19999),
#              BV_CEPH_TIMEOUT seconds allowed for each wait (default 120).
set -euo pipefail
TIMEOUT=${BV_CEPH_TIMEOUT:-120}
log() { printf '[start-rgw %s] %s\n' "$(date +%T.%3N)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
command -v radosgw >/dev/null 2>&1 && command -v radosgw-admin >/dev/null 2>&1 \
  || die "radosgw is not installed; run tests/ceph/install-deps.sh"
DIR=$(cd "$1" && pwd -P)
CONF=$DIR/ceph.conf
[ -f "$DIR/.blockvault-test-cluster" ] && [ -f "$CONF" ] || die "$DIR is not a running test cluster"

# the same test keys on every run: they protect nothing but a throwaway loopback gateway
ACCESS=BVTESTACCESSKEY00001
SECRET=bvtestsecretkey0000000000000000000000001

port_listens() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }
if [ -f "$DIR/rgw.port" ]; then
  PORT=$(cat "$DIR/rgw.port")
elif [ -n "${BV_RGW_PORT:-}" ]; then
  PORT=$BV_RGW_PORT
else
  # pick a port under a lock, so parallel starts do not take the same one
  exec 9>/tmp/blockvault-test-rgw-port.lock
  flock 9
  PORT=
  for p in $(seq 19300 19999); do
    if ! port_listens "$p" && ! grep -qsx "$p" /tmp/blockvault-test-rgw-ports.claimed; then PORT=$p; break; fi
  done
  [ -n "$PORT" ] || die "no free port in 19300-19999"
  echo "$PORT" >>/tmp/blockvault-test-rgw-ports.claimed
  # keep the claim list short: ports listened on now are taken anyway
  tail -n 50 /tmp/blockvault-test-rgw-ports.claimed >/tmp/blockvault-test-rgw-ports.claimed.$$ \
    && mv /tmp/blockvault-test-rgw-ports.claimed.$$ /tmp/blockvault-test-rgw-ports.claimed
  flock -u 9
fi
echo "$PORT" >"$DIR/rgw.port"

if [ ! -f "$DIR/rgw.keyring" ]; then
  timeout "$TIMEOUT" ceph -c "$CONF" auth get-or-create client.rgw.test mon 'allow rw' osd 'allow rwx' \
    >"$DIR/rgw.keyring"
fi
mkdir -p "$DIR/rgw"
log "radosgw on 127.0.0.1:$PORT"
radosgw -c "$CONF" -n client.rgw.test --keyring "$DIR/rgw.keyring" \
  --rgw_frontends "beast endpoint=127.0.0.1:$PORT" --rgw_data "$DIR/rgw" \
  --log-file "$DIR/log/rgw.log" --pid-file "$DIR/run/rgw.pid" --admin-socket "$DIR/run/rgw.asok" \
  --rgw_dns_name 127.0.0.1
t0=$SECONDS
until curl -s -o /dev/null "http://127.0.0.1:$PORT/" 2>/dev/null; do
  [ $((SECONDS - t0)) -lt "$TIMEOUT" ] || die "radosgw did not answer on port $PORT in ${TIMEOUT}s (log: $DIR/log/rgw.log)"
  sleep 0.2
done
if ! timeout "$TIMEOUT" radosgw-admin -c "$CONF" -n client.rgw.test --keyring "$DIR/rgw.keyring" \
     user info --uid bvtest >/dev/null 2>&1; then
  timeout "$TIMEOUT" radosgw-admin -c "$CONF" -n client.rgw.test --keyring "$DIR/rgw.keyring" \
    user create --uid bvtest --display-name bvtest --access-key "$ACCESS" --secret-key "$SECRET" >/dev/null
fi
cat >"$DIR/rgw.env" <<ENV
export BV_S3_ENDPOINT=http://127.0.0.1:$PORT
export AWS_ACCESS_KEY_ID=$ACCESS
export AWS_SECRET_ACCESS_KEY=$SECRET
ENV
log "ready after $((SECONDS - t0))s"
cat "$DIR/rgw.env"
