#!/usr/bin/env bash
# tests/ceph/start-cluster.sh DIR
#
# Start a throwaway single-node Ceph cluster for blockvault's tests:
#   one mon, one mgr, one OSD (memstore by default), pool "rbd" (size 1, 8 PGs),
#   cephx on, msgr2 on 127.0.0.1 only, clone v2 allowed (require_min_compat_client mimic).
# Everything -- conf, keyrings, daemon data, logs, pid files, admin sockets -- lives in DIR.
# DIR must not exist or must be empty (so `DIR=$(mktemp -d)` works).
#
# On success the only line on stdout is
#     export CEPH_CONF=DIR/ceph.conf
# (also written to DIR/env.sh), so `eval "$(tests/ceph/start-cluster.sh DIR)"` sets up the shell;
# the conf names the client.admin keyring, clients need nothing else.  Progress goes to stderr.
# Stop it with tests/ceph/stop-cluster.sh DIR.  On failure the daemons are stopped and DIR is
# kept for its logs (DIR/log); remove it with stop-cluster.sh.
#
# Environment knobs:
#   BV_CEPH_BACKEND        memstore (default; data in OSD RAM) | bluestore (sparse file in DIR)
#   BV_CEPH_OSD_GB         capacity the OSD reports, GiB (default 16)
#   BV_CEPH_MGR            1 (default) | 0 = no ceph-mgr (faster start, ~300 MB less RAM;
#                          RBD works, `ceph df` shows no pool stats, health WARNs after a while)
#   BV_CEPH_POOL           pool name (default rbd)
#   BV_CEPH_MON_PORT       fixed mon port (default: first free one in 18300-19299)
#   BV_CEPH_MOUNT_TIMEOUT  client_mount_timeout written to [client] (default 15 s)
#   BV_CEPH_TIMEOUT        seconds allowed for each wait (default 120)
set -euo pipefail

BACKEND=${BV_CEPH_BACKEND:-memstore}
OSD_GB=${BV_CEPH_OSD_GB:-16}
WITH_MGR=${BV_CEPH_MGR:-1}
POOL=${BV_CEPH_POOL:-rbd}
MOUNT_TIMEOUT=${BV_CEPH_MOUNT_TIMEOUT:-15}
TIMEOUT=${BV_CEPH_TIMEOUT:-120}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# One lock file for the whole machine: every start-cluster.sh picks its mon port under it and
# holds it until its mon listens.  The range is disjoint from the one used by
# /work/shared/notes/ceph-reference/start-ceph.sh (17300+), which takes a different lock.
PORT_LOCK=/tmp/blockvault-ceph-ports.lock
PORT_MIN=18300
PORT_MAX=19299

T_START=$(date +%s.%N)
log() { printf '[start-cluster %s] %s\n' "$(date +%T.%3N)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
case "$BACKEND" in memstore|bluestore) ;; *) die "BV_CEPH_BACKEND must be memstore or bluestore";; esac

missing=()
for b in ceph ceph-mon ceph-osd ceph-authtool monmaptool rbd rados flock ss timeout; do
  command -v "$b" >/dev/null 2>&1 || missing+=("$b")
done
if [ "$WITH_MGR" = 1 ] && ! command -v ceph-mgr >/dev/null 2>&1; then missing+=(ceph-mgr); fi
[ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}; run tests/ceph/install-deps.sh"

if [ -e "$1" ] && [ -n "$(ls -A "$1" 2>/dev/null)" ]; then
  die "$1 exists and is not empty (stop an old cluster with tests/ceph/stop-cluster.sh $1)"
fi
mkdir -p "$1"
DIR=$(cd "$1" && pwd -P)
case "$DIR" in *[[:space:]]*) die "DIR must not contain whitespace: $DIR";; esac
mkdir -p "$DIR"/run "$DIR"/log "$DIR"/crash "$DIR"/mon.a "$DIR"/mgr.x "$DIR"/osd.0
# stop-cluster.sh only touches directories carrying this marker
echo "blockvault test cluster, started $(date -Is) by pid $$" >"$DIR/.blockvault-test-cluster"
CONF=$DIR/ceph.conf

on_exit() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    log "start failed (exit $rc); stopping daemons, keeping $DIR for its logs"
    "$SCRIPT_DIR/stop-cluster.sh" --keep "$DIR" >&2 || true
  fi
}
trap on_exit EXIT

# wait_until DESCRIPTION COMMAND...: retry COMMAND every 0.1-0.5 s for up to $TIMEOUT s
wait_until() {
  local what=$1 t0=$SECONDS delay=0.1; shift
  until "$@"; do
    [ $((SECONDS - t0)) -lt "$TIMEOUT" ] || die "timed out after ${TIMEOUT}s waiting for $what (logs: $DIR/log)"
    sleep "$delay"; delay=0.3
  done
}
port_in_use() { [ -n "$(ss -Htan "sport = :$1" 2>/dev/null)" ]; }
port_listens() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }
cephc() { timeout "$TIMEOUT" ceph -c "$CONF" --connect-timeout "$TIMEOUT" "$@"; }

# ---- mon port, under the machine-wide lock (held until the mon listens)
exec {lockfd}>>"$PORT_LOCK"
flock -w "$TIMEOUT" "$lockfd" || die "could not lock $PORT_LOCK within ${TIMEOUT}s"
if [ -n "${BV_CEPH_MON_PORT:-}" ]; then
  PORT=$BV_CEPH_MON_PORT
  ! port_in_use "$PORT" || die "BV_CEPH_MON_PORT=$PORT is in use"
else
  # below the ephemeral range, so no outgoing connection can own the port
  PORT=$PORT_MIN
  while port_in_use "$PORT"; do
    PORT=$((PORT + 1))
    [ "$PORT" -le "$PORT_MAX" ] || die "no free port in $PORT_MIN-$PORT_MAX"
  done
fi
MON_ADDR=v2:127.0.0.1:$PORT
FSID=$(cat /proc/sys/kernel/random/uuid)
log "dir=$DIR mon=$MON_ADDR osd=$BACKEND mgr=$WITH_MGR pool=$POOL"

cat >"$CONF" <<EOF
# written by blockvault tests/ceph/start-cluster.sh -- throwaway test cluster
[global]
fsid = $FSID
mon_host = [$MON_ADDR]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_msgr2 = true
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
run_dir = $DIR/run
crash_dir = $DIR/crash
pid_file = $DIR/run/\$name.pid
admin_socket = $DIR/run/\$name.asok
log_file = $DIR/log/\$name.log
log_to_stderr = false
err_to_stderr = true
mon_cluster_log_file = default=$DIR/log/\$channel.log cluster=$DIR/log/cluster.log
# single OSD: size-1 pools, no host-level CRUSH separation, fixed PG count
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
mon_mgr_inactive_grace = 31536000
# clone v2 (clones of unprotected snapshots)
mon_osd_initial_require_min_compat_client = mimic
# commit paxos proposals quickly: halves the start time
paxos_propose_interval = 0.1
# read at mon mkfs, so it must be in [global]: no mgr modules
mgr_initial_modules =

[mon]
mon_data = $DIR/\$name
keyring = $DIR/\$name/keyring

[mgr]
mgr_data = $DIR/\$name
keyring = $DIR/\$name/keyring
# loading every python module takes the mgr 15 s on a busy 2-core machine: load only the
# always-on ones the mon expects (balancer crash devicehealth orchestrator pg_autoscaler
# progress rbd_support status telemetry volumes)
mgr_disabled_modules = alerts diskprediction_local influx insights iostat localpool mirroring nfs osd_perf_query osd_support prometheus restful selftest snap_schedule stats telegraf test_orchestrator zabbix

[osd]
osd_data = $DIR/\$name
keyring = $DIR/\$name/keyring
osd_objectstore = $BACKEND
memstore_device_bytes = $((OSD_GB << 30))
bluestore_block_create = true
bluestore_block_size = $((OSD_GB << 30))
bluestore_fsck_on_mount = false
osd_memory_target = 939524096
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1

[client]
keyring = $DIR/ceph.client.admin.keyring
client_mount_timeout = $MOUNT_TIMEOUT
admin_socket =
log_file =
EOF

# ---- keys: mon., client.admin and mgr.x go into the mon's initial keyring
ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$DIR/ceph.client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool --create-keyring "$DIR/mgr.x/keyring" --gen-key -n mgr.x \
  --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/ceph.client.admin.keyring" >/dev/null
ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/mgr.x/keyring" >/dev/null
chmod 600 "$DIR"/*.keyring "$DIR"/mgr.x/keyring

# ---- mon
monmaptool --create --fsid "$FSID" --addv a "[$MON_ADDR]" "$DIR/monmap" >/dev/null
ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring" \
  >"$DIR/log/mon.a.mkfs.log" 2>&1 || { cat "$DIR/log/mon.a.mkfs.log" >&2; die "ceph-mon --mkfs failed"; }
ceph-mon -c "$CONF" -i a </dev/null >>"$DIR/log/mon.a.stdio" 2>&1
wait_until "the mon to listen on port $PORT" port_listens "$PORT"
flock -u "$lockfd"; exec {lockfd}>&-
log "mon.a listening on $MON_ADDR"

# ---- mgr (its key is already known to the mon)
if [ "$WITH_MGR" = 1 ]; then
  ceph-mgr -c "$CONF" -i x </dev/null >>"$DIR/log/mgr.x.stdio" 2>&1
fi

# ---- osd.0
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
OSD_KEY=$(ceph-authtool --gen-print-key)
printf '{"cephx_secret": "%s"}' "$OSD_KEY" >"$DIR/osd.0/new.json"
OSD_ID=$(cephc osd new "$OSD_UUID" -i "$DIR/osd.0/new.json")
rm -f "$DIR/osd.0/new.json"
[ "$OSD_ID" = 0 ] || die "ceph osd new returned id '$OSD_ID', expected 0"
ceph-authtool --create-keyring "$DIR/osd.0/keyring" -n osd.0 --add-key "$OSD_KEY" >/dev/null
ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" >"$DIR/log/osd.0.mkfs.log" 2>&1 \
  || { cat "$DIR/log/osd.0.mkfs.log" >&2; die "ceph-osd --mkfs failed"; }
ceph-osd -c "$CONF" -i 0 </dev/null >>"$DIR/log/osd.0.stdio" 2>&1
log "osd.0 started ($BACKEND)"

osd_up() { cephc osd dump 2>/dev/null >"$DIR/run/osd-dump.txt" && grep -q '^osd\.0 up' "$DIR/run/osd-dump.txt"; }
wait_until "osd.0 to be up" osd_up
if ! grep -q '^require_min_compat_client mimic' "$DIR/run/osd-dump.txt"; then
  cephc osd set-require-min-compat-client mimic >>"$DIR/log/commands.log" 2>&1
fi
log "osd.0 up"

# ---- pool
cephc osd pool create "$POOL" 8 8 replicated >>"$DIR/log/commands.log" 2>&1
timeout "$TIMEOUT" rbd -c "$CONF" pool init "$POOL" >>"$DIR/log/commands.log" 2>&1
log "pool $POOL created and initialised for rbd"

# ---- the pool must really serve RBD I/O: create, write and remove a probe image
PROBE="$POOL/.start-cluster-probe"
probe() {
  timeout 30 rbd -c "$CONF" create --size 8M "$PROBE" >>"$DIR/log/commands.log" 2>&1 &&
  timeout 30 rbd -c "$CONF" bench --io-type write --io-size 4M --io-total 8M "$PROBE" \
    >>"$DIR/log/commands.log" 2>&1 &&
  timeout 30 rbd -c "$CONF" rm --no-progress "$PROBE" >>"$DIR/log/commands.log" 2>&1 && return 0
  timeout 30 rbd -c "$CONF" rm --no-progress "$PROBE" >/dev/null 2>&1 || true
  return 1
}
wait_until "pool $POOL to serve rbd I/O" probe
log "pool $POOL serves rbd I/O"

# ---- health OK/WARN, and the mgr active
healthy() {
  local h
  h=$(cephc health 2>/dev/null) || return 1
  case "$h" in HEALTH_OK*|HEALTH_WARN*) ;; *) return 1;; esac
  [ "$WITH_MGR" != 1 ] || cephc mgr stat 2>/dev/null | grep -q '"available": true'
}
wait_until "health OK/WARN$([ "$WITH_MGR" = 1 ] && echo ' and an active mgr')" healthy

echo "export CEPH_CONF=$CONF" >"$DIR/env.sh"
trap - EXIT
log "cluster ready in $(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s: $(cephc health 2>/dev/null)"
echo "export CEPH_CONF=$CONF"
