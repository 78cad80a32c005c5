#!/usr/bin/env bash
# Build (or reuse) the benchmark data set under a cache directory.
#
#   bench/make-data.sh [--smoke] CACHE_DIR
#
# Produces in CACHE_DIR:
#   base.img    ext4 image holding a Debian minbase root filesystem (debootstrap)
#   day2.img    copy of base.img with packages installed into it via chroot
#   random.img  random data
#   sparse.img  mostly holes, a few hundred MiB written at scattered offsets
#   data.json   sizes, block-diff count between base and day2, build times
#
# Every artefact is built as NAME.partial and renamed when complete, so an
# interrupted run resumes where it stopped. Needs root (loop mount, chroot).
# --smoke builds tiny images (64 MiB) from a handful of downloaded .debs
# instead of a full debootstrap, in well under a minute.
set -euo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
CACHE=${1:?usage: make-data.sh [--smoke] CACHE_DIR}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)

if ((SMOKE)); then
    SIZE=$((64 << 20))
    SPARSE_WRITES=8          # x 1 MiB pieces
    SPARSE_PIECE=$((1 << 20))
else
    SIZE=$((4 << 30))
    SPARSE_WRITES=75         # x 4 MiB = 300 MiB
    SPARSE_PIECE=$((4 << 20))
fi
# Packages installed into the day-2 copy (full data set).
DAY2_PACKAGES=${BENCH_DAY2_PACKAGES:-python3}

log() { printf '[make-data %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

need() {
    local missing=()
    for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
    ((${#missing[@]} == 0)) && return 0
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # debootstrap / mkfs.ext4 / dpkg-deb map to their Debian packages
    local pkgs=()
    for c in "${missing[@]}"; do
        case $c in
            mkfs.ext4) pkgs+=(e2fsprogs) ;;
            *) pkgs+=("$c") ;;
        esac
    done
    apt-get install -y -qq "${pkgs[@]}" >/dev/null || {
        apt-get update -qq && apt-get install -y -qq "${pkgs[@]}" >/dev/null
    }
}

# The Debian mirror and suite this machine's apt uses (deb822 or one-line form).
detect_mirror() {
    local uri="" suite=""
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -e $f ]] || continue
        # first stanza that is not a security archive
        read -r uri suite < <(awk '
            BEGIN { RS = ""; FS = "\n" }
            {
                u = ""; s = ""; t = 0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^Types:.*\<deb\>/) t = 1
                    if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); u = a[2] }
                    if ($i ~ /^Suites:/) { split($i, a, /[ \t]+/); s = a[2] }
                }
                if (t && u != "" && s != "" && u !~ /security/ && s !~ /security/) { print u, s; exit }
            }' "$f") || true
        [[ -n $uri ]] && break
    done
    if [[ -z $uri ]]; then
        read -r uri suite < <(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i, $(i+1); exit } }') || true
    fi
    [[ -n $uri ]] || uri=http://deb.debian.org/debian
    if [[ -z $suite ]]; then
        suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    fi
    MIRROR=$uri
    SUITE=$suite
}

MOUNTS=()
cleanup() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount -R "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null || true
        case ${MOUNTS[i]} in "$CACHE"/mnt.*) rmdir "${MOUNTS[i]}" 2>/dev/null || true ;; esac
    done
    MOUNTS=()
}
trap cleanup EXIT

mount_img() { # IMG DIR
    mkdir -p "$2"
    mount -o loop "$1" "$2"
    MOUNTS+=("$2")
}

now() { date +%s.%N; }

build_base_full() {
    local mnt=$CACHE/mnt.base
    detect_mirror
    log "base: debootstrap --variant=minbase $SUITE $MIRROR into a $((SIZE >> 30)) GiB ext4 image"
    rm -f "$CACHE/base.img.partial"
    truncate -s "$SIZE" "$CACHE/base.img.partial"
    mkfs.ext4 -q -F -L bvbench "$CACHE/base.img.partial"
    mount_img "$CACHE/base.img.partial" "$mnt"
    debootstrap --variant=minbase "$SUITE" "$mnt" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || {
        tail -20 "$CACHE/debootstrap.log" >&2
        return 1
    }
    echo "$MIRROR $SUITE" >"$CACHE/mirror.txt"
    sync
    cleanup
}

# Install packages into a loop-mounted image through chroot (real churn:
# apt lists, dpkg database, new files scattered by ext4's allocator).
chroot_install() { # MNT PKGS...
    local mnt=$1
    shift
    mount -t proc proc "$mnt/proc"
    MOUNTS+=("$mnt/proc")
    mount --rbind /dev "$mnt/dev"
    mount --make-rslave "$mnt/dev"
    MOUNTS+=("$mnt/dev")
    mount -t sysfs sys "$mnt/sys"
    MOUNTS+=("$mnt/sys")
    cp -L /etc/resolv.conf "$mnt/etc/resolv.conf" 2>/dev/null || true
    printf '#!/bin/sh\nexit 101\n' >"$mnt/usr/sbin/policy-rc.d"
    chmod +x "$mnt/usr/sbin/policy-rc.d"
    chroot "$mnt" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -c "apt-get update -q && apt-get install -y -q $*" >"$CACHE/day2-install.log" 2>&1 || {
        tail -20 "$CACHE/day2-install.log" >&2
        return 1
    }
    rm -f "$mnt/usr/sbin/policy-rc.d"
}

build_day2_full() {
    local mnt=$CACHE/mnt.day2
    log "day2: cp --sparse=always base.img, chroot apt-get install $DAY2_PACKAGES"
    rm -f "$CACHE/day2.img.partial"
    cp --sparse=always "$CACHE/base.img" "$CACHE/day2.img.partial"
    mount_img "$CACHE/day2.img.partial" "$mnt"
    # shellcheck disable=SC2086
    chroot_install "$mnt" $DAY2_PACKAGES
    sync
    cleanup
}

# Smoke: a tiny ext4 image populated from a few .deb packages (no debootstrap).
smoke_debs() { # DIR PKGS...
    local dir=$1
    shift
    mkdir -p "$dir"
    (cd "$dir" && for p in "$@"; do ls "${p}"_*.deb >/dev/null 2>&1 || apt-get download -q "$p" >/dev/null; done)
}

build_base_smoke() {
    local stage=$CACHE/stage.base
    log "base (smoke): 64 MiB ext4 image from a few Debian packages"
    smoke_debs "$CACHE/debs" coreutils bash grep sed tar
    rm -rf "$stage" && mkdir -p "$stage"
    local d
    for d in coreutils bash grep sed tar; do dpkg-deb -x "$CACHE/debs/${d}"_*.deb "$stage"; done
    rm -f "$CACHE/base.img.partial"
    truncate -s "$SIZE" "$CACHE/base.img.partial"
    mkfs.ext4 -q -F -L bvsmoke -d "$stage" "$CACHE/base.img.partial"
    rm -rf "$stage"
}

build_day2_smoke() {
    local mnt=$CACHE/mnt.day2
    log "day2 (smoke): copy + extract more packages into the loop-mounted copy"
    smoke_debs "$CACHE/debs" gzip findutils diffutils
    rm -f "$CACHE/day2.img.partial"
    cp --sparse=always "$CACHE/base.img" "$CACHE/day2.img.partial"
    mount_img "$CACHE/day2.img.partial" "$mnt"
    local d
    for d in gzip findutils diffutils; do dpkg-deb -x "$CACHE/debs/${d}"_*.deb "$mnt"; done
    rm -f "$mnt/usr/bin/sed"   # a deletion too
    sync
    cleanup
}

build_random() {
    log "random: $((SIZE >> 20)) MiB from /dev/urandom"
    rm -f "$CACHE/random.img.partial"
    head -c "$SIZE" /dev/urandom >"$CACHE/random.img.partial"
}

build_sparse() {
    log "sparse: $((SIZE >> 20)) MiB image, $SPARSE_WRITES x $((SPARSE_PIECE >> 20)) MiB written at scattered offsets"
    rm -f "$CACHE/sparse.img.partial"
    truncate -s "$SIZE" "$CACHE/sparse.img.partial"
    # Deterministic scattered offsets (piece-aligned); content half random,
    # half compressible text so compressors have something to do.
    python3 - "$CACHE/sparse.img.partial" "$SIZE" "$SPARSE_WRITES" "$SPARSE_PIECE" <<'EOF'
import os, random, sys
path, size, n, piece = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(20240605)
slots = rng.sample(range(size // piece), n)
text = b"".join(b"blockvault sparse bench line %08d\n" % i for i in range(piece // 32 + 1))[:piece]
with open(path, "r+b") as f:
    for i, s in enumerate(sorted(slots)):
        f.seek(s * piece)
        f.write(os.urandom(piece) if i % 2 == 0 else text)
EOF
}

build() { # NAME FUNC
    if [[ -s $CACHE/$1 ]]; then
        log "$1: cached"
        return 0
    fi
    local t0
    t0=$(now)
    "$2"
    sync
    mv "$CACHE/$1.partial" "$CACHE/$1"
    echo "$(now) - $t0" | bc >"$CACHE/$1.seconds"
    log "$1: done in $(cat "$CACHE/$1.seconds") s"
}

if ((SMOKE)); then
    need mkfs.ext4 dpkg-deb bc
    build base.img build_base_smoke
    build day2.img build_day2_smoke
else
    need mkfs.ext4 debootstrap bc
    build base.img build_base_full
    build day2.img build_day2_full
fi
build random.img build_random
build sparse.img build_sparse

# Summary: block-diff between base and day2 at 4 MiB granularity, and how
# much of each image is allocated.
if [[ ! -s $CACHE/data.json ]] || [[ $CACHE/day2.img -nt $CACHE/data.json ]]; then
    log "comparing base and day2 in 4 MiB blocks"
    python3 "$HERE/blockdiff.py" "$CACHE" >"$CACHE/data.json.partial"
    mv "$CACHE/data.json.partial" "$CACHE/data.json"
fi
cat "$CACHE/data.json"
