#!/usr/bin/env bash
# bench/fleet.sh: costs that grow with the fleet (issue 13 item 3, issue 11's
# GC figure). Builds a directory store of IMAGES small sparse file images
# with BACKUPS real backups each (every round changes a few blocks of every
# image, then one `blockvault backup --all` backs them all up), then times
# `list`, `list IMAGE`, `verify`, `verify --deep` of a sample, `catalog
# rebuild`, `prune`, `gc` and measures the metadata bytes per backup and the
# daemon's idle CPU and RSS with every image scheduled.
#
#   bench/fleet.sh [--images N] [--backups N] [--size MIB] [--block-size S]
#                  [--reps N] [--idle SECONDS] [--dir DIR] [--out FILE] [--keep]
#                  [--measure-only]   (a store built before in DIR, kept with --keep)
#                  [--build-only]     (build the store in DIR and keep it, measure nothing)
#
# Defaults: 100 images x 10 backups, 64 MiB images with 1M blocks, 3
# repetitions of every read-only command (the median is reported), 60 s of
# daemon idle. Bounded: the build of the store is the only part that grows
# with IMAGES x BACKUPS; everything else is a handful of commands. Not part
# of CI. The store's directory decides what is measured: on a disk every
# commit pays its fsyncs (~0.2 s a backup on a loaded VM), on tmpfs
# (`--dir /dev/shm/...`) they are free and what remains is CPU and syscalls. BLOCKVAULT=/path/to/binary picks the binary (default
# target/debug/blockvault, built if missing).
set -euo pipefail

IMAGES=100 BACKUPS=10 SIZE_MIB=64 BLOCK_SIZE=1M REPS=3 IDLE=60 DIR="" OUT="" KEEP=0 MEASURE_ONLY=0 BUILD_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --images) IMAGES=$2; shift 2 ;;
        --backups) BACKUPS=$2; shift 2 ;;
        --size) SIZE_MIB=$2; shift 2 ;;
        --block-size) BLOCK_SIZE=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --idle) IDLE=$2; shift 2 ;;
        --dir) DIR=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --measure-only) MEASURE_ONLY=1; KEEP=1; shift ;;
        --build-only) BUILD_ONLY=1; KEEP=1; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BV=${BLOCKVAULT:-$ROOT/target/debug/blockvault}
if [ ! -x "$BV" ]; then
    (cd "$ROOT" && cargo build -p blockvault --bin blockvault)
fi
[ -n "$DIR" ] || DIR=$(mktemp -d /tmp/bv-fleet.XXXXXX)
mkdir -p "$DIR"
OUT=${OUT:-$DIR/results-fleet.md}
CFG=$DIR/config.toml
IMGDIR=$DIR/images
STORE=$DIR/store
LOG=$DIR/log
mkdir -p "$IMGDIR"
DAEMON_PID=""
cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null || true
    if [ "$KEEP" = 0 ]; then rm -rf "$IMGDIR" "$STORE" "$DIR/catalog.sqlite"*; fi
}
trap cleanup EXIT

bv() { "$BV" --config "$CFG" --no-progress "$@"; }

KEEP_LAST=$(( BACKUPS / 2 > 0 ? BACKUPS / 2 : 1 ))
if [ "$MEASURE_ONLY" = 0 ]; then
# ---- config: every image scheduled, retention for prune, gc-grace 0 -------
{
    cat <<EOF
[store]
path = "$STORE"
gc-grace = "0s"
[catalog]
path = "$DIR/catalog.sqlite"
[defaults]
block-size = "$BLOCK_SIZE"
schedule = "30 1 * * *"
retention = { keep-last = $KEEP_LAST }
prune-after-backup = false
[daemon]
random-delay = "0s"
EOF
    for i in $(seq -f %04g 1 "$IMAGES"); do
        printf '[[image]]\nname = "img%s"\nsource = "file:%s/img%s.raw"\n' "$i" "$IMGDIR" "$i"
    done
} > "$CFG"

# ---- images: sparse, a few MiB written; each round changes 3 small extents --
python3 - "$IMGDIR" "$IMAGES" "$SIZE_MIB" init <<'EOF'
import os, random, sys
d, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20
for i in range(1, n + 1):
    with open(f"{d}/img{i:04d}.raw", "wb") as f:
        f.truncate(size)
        r = random.Random(i)
        for k in range(4):  # 4 x 16 KiB of data at random places
            f.seek(r.randrange(0, size - (16 << 10), 4096))
            f.write(os.urandom(16 << 10))
EOF
mutate() {
    python3 - "$IMGDIR" "$IMAGES" "$SIZE_MIB" "$1" <<'EOF'
import os, random, sys
d, n, size, rnd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20, int(sys.argv[4])
for i in range(1, n + 1):
    with open(f"{d}/img{i:04d}.raw", "r+b") as f:
        r = random.Random(i * 100003 + rnd)
        for k in range(3):  # 3 x 512 bytes changed per backup
            f.seek(r.randrange(0, size - 512, 512))
            f.write(os.urandom(512))
EOF
}

fi
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# time_cmd LABEL ARGS...: REPS runs of blockvault ARGS, prints "LABEL median min max maxrss_kib"
declare -A RESULT
time_cmd() {
    local label=$1; shift
    local ts=() rss=0
    for _ in $(seq 1 "$REPS"); do
        local t0 t1
        t0=$(now)
        /usr/bin/time -f %M -o "$DIR/rss" "$BV" --config "$CFG" --no-progress "$@" > "$LOG.$label" 2>&1 || { echo "FAILED: $label: $*" >&2; tail -5 "$LOG.$label" >&2; exit 1; }
        t1=$(now)
        ts+=("$(echo "$t1 - $t0" | bc -l)")
        local r; r=$(tail -1 "$DIR/rss"); [ "$r" -gt "$rss" ] && rss=$r
    done
    local med; med=$(printf '%s\n' "${ts[@]}" | median)
    RESULT[$label]=$(printf '%.3f s (%s runs: %s), max RSS %d MiB' "$med" "$REPS" "$(printf '%.2f ' "${ts[@]}")" $(( rss / 1024 )))
    printf '%-28s %s\n' "$label" "${RESULT[$label]}"
}

echo "fleet bench: $IMAGES images x $BACKUPS backups, ${SIZE_MIB} MiB images, block size $BLOCK_SIZE, in $DIR"
uptime
LOAD_START=$(uptime | sed 's/.*load average: //')
[ "$MEASURE_ONLY" = 1 ] || bv init > /dev/null

# ---- build: BACKUPS rounds of one `backup --all` -------------------------
BUILD0=$(now)
ROUND_TIMES=()
[ "$MEASURE_ONLY" = 1 ] && BACKUPS_TO_MAKE=0 || BACKUPS_TO_MAKE=$BACKUPS
for r in $(seq 1 "$BACKUPS_TO_MAKE"); do
    [ "$r" -gt 1 ] && mutate "$r"
    t0=$(now)
    bv backup --all > "$LOG.backup" 2>&1 || { tail -20 "$LOG.backup" >&2; exit 1; }
    t1=$(now)
    ROUND_TIMES+=("$(echo "$t1 - $t0" | bc -l)")
    printf 'round %d: %d backups in %.2f s\n' "$r" "$IMAGES" "${ROUND_TIMES[-1]}"
done
BUILD1=$(now)
NBACKUPS=$(bv list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$MEASURE_ONLY" = 1 ] || [ "$NBACKUPS" = $(( IMAGES * BACKUPS )) ] || { echo "expected $(( IMAGES * BACKUPS )) backups, list shows $NBACKUPS" >&2; exit 1; }
if [ "$BUILD_ONLY" = 1 ]; then
    printf 'built %d backups in %.1f s; measure with --measure-only --dir %s\n' "$NBACKUPS" "$(echo "$BUILD1 - $BUILD0" | bc -l)" "$DIR"
    exit 0
fi

# ---- metadata bytes per backup --------------------------------------------
sz() { find "$STORE/backups" -maxdepth 1 -name "*.$1" -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }
MANIFEST_B=$(sz json); BLOCKMAP_B=$(sz blockmap); CLAIM_B=$(sz claim)
CATALOG_B=$(stat -c %s "$DIR/catalog.sqlite")
BACKUPS_DU=$(du -sk --apparent-size "$STORE/backups" | cut -f1)
BACKUPS_ALLOC=$(du -sk "$STORE/backups" | cut -f1)
NFILES=$(find "$STORE/backups" -maxdepth 1 -type f | wc -l)

# ---- the read-only commands ------------------------------------------------
SAMPLE=$(printf 'img%04d' $(( (IMAGES + 1) / 2 )))
time_cmd list list
time_cmd list-json list --json
time_cmd list-image list "$SAMPLE"
time_cmd verify verify
time_cmd verify-deep-image verify --deep "$SAMPLE"
time_cmd gc-dry-run gc --dry-run
time_cmd catalog-rebuild catalog rebuild
time_cmd prune-dry-run prune --dry-run

# ---- the commands that change the store: once each ------------------------
REPS_SAVED=$REPS REPS=1
time_cmd gc-nothing-to-do gc
time_cmd prune prune
time_cmd gc-after-prune gc
REPS=$REPS_SAVED
NLEFT=$(bv list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')

# ---- the daemon idle, every image scheduled -------------------------------
DAEMON_LINE="not measured (--idle 0)"
if [ "$IDLE" -gt 0 ]; then
    "$BV" --config "$CFG" --no-progress daemon > "$LOG.daemon" 2>&1 &
    DAEMON_PID=$!
    sleep 5
    HZ=$(getconf CLK_TCK)
    cpu() { awk '{print $14 + $15}' "/proc/$DAEMON_PID/stat"; }
    c0=$(cpu); w0=$(now)
    sleep "$IDLE"
    c1=$(cpu); w1=$(now)
    RSS_KB=$(awk '/VmRSS/ {print $2}' "/proc/$DAEMON_PID/status")
    THREADS=$(awk '/Threads/ {print $2}' "/proc/$DAEMON_PID/status")
    VOLCS=$(awk '/^voluntary_ctxt_switches/ {print $2}' "/proc/$DAEMON_PID/status")
    kill "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true; DAEMON_PID=""
    DAEMON_LINE=$(printf '%d ticks (%.3f s CPU) in %.0f s of wall time = %.3f %% of one core; RSS %d MiB, %d threads, %d voluntary context switches since start' \
        $(( c1 - c0 )) "$(echo "($c1 - $c0) / $HZ" | bc -l)" "$(echo "$w1 - $w0" | bc -l)" \
        "$(echo "($c1 - $c0) / $HZ / ($w1 - $w0) * 100" | bc -l)" $(( RSS_KB / 1024 )) "$THREADS" "$VOLCS")
    echo "daemon idle: $DAEMON_LINE"
fi
LOAD_END=$(uptime | sed 's/.*load average: //')

per() { echo "$1 / $NBACKUPS" | bc; }
{
    echo "## Fleet: $IMAGES images x $BACKUPS backups ($NBACKUPS backups), $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "\`bench/fleet.sh --images $IMAGES --backups $BACKUPS --size $SIZE_MIB --block-size $BLOCK_SIZE --reps $REPS --idle $IDLE\`,"
    echo "binary \`$(basename "$BV")\` ($( [[ $BV == */release/* ]] && echo release || echo dev profile)), $(nproc) cores; load average at start $LOAD_START, at end $LOAD_END."
    echo "Images: ${SIZE_MIB} MiB sparse files, 64 KiB written, 3 x 512 bytes changed per backup (small, so that 100k backups fit in a few GB); one \`backup --all\` per round."
    echo
    echo "| what | figure |"
    echo "|---|---|"
    [ "$MEASURE_ONLY" = 1 ] && echo "| build | measured on a store built before (\`--measure-only\`) |" || \
    echo "| build: $NBACKUPS backups | $(printf '%.1f' "$(echo "$BUILD1 - $BUILD0" | bc -l)") s; rounds $(printf '%.1f ' "${ROUND_TIMES[@]}")s |"
    for k in list list-json list-image verify verify-deep-image gc-dry-run catalog-rebuild prune-dry-run gc-nothing-to-do prune gc-after-prune; do
        echo "| \`$k\` | ${RESULT[$k]} |"
    done
    echo "| backups left after prune ($(grep -o 'keep-last = [0-9]*' "$CFG")) | $NLEFT |"
    echo "| metadata per backup: manifest | $(per "$MANIFEST_B") B |"
    echo "| metadata per backup: block map | $(per "$BLOCKMAP_B") B |"
    echo "| metadata per backup: id claim | $(per "$CLAIM_B") B |"
    echo "| metadata per backup: catalog (file size / backups) | $(per "$CATALOG_B") B |"
    echo "| store \`backups/\`: files, apparent / allocated | $NFILES files, $BACKUPS_DU / $BACKUPS_ALLOC KiB ($(per $(( BACKUPS_ALLOC * 1024 ))) B allocated per backup) |"
    echo "| daemon idle, $IMAGES images scheduled | $DAEMON_LINE |"
    echo
} | tee "$OUT"
echo "report: $OUT"
