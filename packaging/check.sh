#!/usr/bin/env bash
# Checks the packaging end to end:
#   1. `systemd-analyze verify` on the units in packaging/systemd, offline
#   2. a release build, its man pages (`blockvault man`, from clap), then
#      `cargo deb -p blockvault --no-build` builds the .deb
#   3. the .deb lists the expected files, modes, conffile and dependencies
#   4. `dpkg -i` installs it: config 0600, store directory 0700, installed
#      units verify against the real binary, the binary runs
#   5. `dpkg --purge` removes it and leaves the store directory in place
#
# Exits non-zero with "packaging check FAILED: <which check>" on the first
# failure. Needs root (dpkg -i). Installs systemd, binutils and cargo-deb if
# they are missing, so later runs only rebuild what changed.
#
# Environment:
#   CARGO_TARGET_DIR             honoured as by cargo (the .deb lands in its debian/)
#   BLOCKVAULT_KEEP_INSTALLED=1  skip step 5 and leave the package installed
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

START=$SECONDS
fail() {
    echo "packaging check FAILED: $*" >&2
    exit 1
}
step() {
    echo "== [$((SECONDS - START))s] $*"
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

UNITS_DIR=packaging/systemd
UNIT_FILES=(
    blockvault.service
    blockvault-run@.service
    blockvault-run@.timer
    blockvault-run-all.service
    blockvault-run-all.timer
)
# Templates can only be verified as instances.
VERIFY_UNITS=(
    blockvault.service
    blockvault-run@vm-101.service
    blockvault-run@vm-101.timer
    blockvault-run-all.service
    blockvault-run-all.timer
)

apt_install() {
    step "installing $* with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update (needed to install $*)"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null || fail "apt-get install $*"
}

# systemd-analyze verify exits 0 on many problems (unknown keys, bad values
# are "ignoring" warnings), so any output at all counts as a failure.
verify_units() {
    local what=$1
    shift
    local out
    if ! out=$(systemd-analyze verify "$@" 2>&1) || [ -n "$out" ]; then
        echo "$out" >&2
        fail "systemd-analyze verify ($what)"
    fi
}

# --- tools -------------------------------------------------------------------
step "tools"
[ "$(id -u)" = 0 ] || fail "must run as root (dpkg -i)"
command -v systemd-analyze >/dev/null || apt_install systemd
command -v objcopy >/dev/null || apt_install binutils # separate-debug-symbols
command -v dpkg-deb >/dev/null || fail "dpkg-deb missing: not a Debian system?"
if ! cargo deb --version >/dev/null 2>&1; then
    step "installing cargo-deb (once per machine)"
    cargo install cargo-deb --locked --version '^3' || fail "cargo install cargo-deb"
fi

# --- 1. units, offline -------------------------------------------------------
# No systemd runs here, and /usr/bin/blockvault may not exist (or be stale).
# `verify --root` loads units from a scratch root instead: it holds our units,
# the host's stock units (sysinit.target etc. must resolve), /bin/kill for
# ExecReload, and a stub /usr/bin/blockvault, since verify only checks that
# the command is executable. Step 4 verifies again against the real binary.
step "1. systemd-analyze verify (source units, offline)"
VROOT=$WORK/root
mkdir -p "$VROOT/lib/systemd/system" "$VROOT/usr/bin" "$VROOT/bin"
cp -a /lib/systemd/system/. "$VROOT/lib/systemd/system/" || fail "copying the host's stock units for verify"
for unit in "${UNIT_FILES[@]}"; do
    [ -f "$UNITS_DIR/$unit" ] || fail "unit file $UNITS_DIR/$unit missing"
    cp "$UNITS_DIR/$unit" "$VROOT/lib/systemd/system/"
done
# The unit names /bin/kill (procps); `command -v kill` would find the builtin.
[ -x /bin/kill ] || apt_install procps
cp /bin/kill "$VROOT/bin/kill" || fail "copying /bin/kill for verify"
printf '#!/bin/sh\nexit 0\n' >"$VROOT/usr/bin/blockvault"
chmod 755 "$VROOT/usr/bin/blockvault"
verify_units "source units" --root="$VROOT" "${VERIFY_UNITS[@]}"

# --- 2. build ----------------------------------------------------------------
# --fast: lighter xz compression; this .deb is for checking, and it halves
# the packaging time on a 2-core machine. Release builds drop the flag.
step "2. cargo build --release, man pages, cargo deb -p blockvault --fast"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
cargo build --release --locked -p blockvault --bin blockvault || fail "cargo build --release -p blockvault"
# agent/Cargo.toml ships target/release/man/*.1.gz: gzipped here, since
# whether cargo-deb compresses man pages depends on its version and flags
MAN_DIR=$TARGET_DIR/release/man
rm -rf "$MAN_DIR"
"$TARGET_DIR/release/blockvault" man --out "$MAN_DIR" >/dev/null || fail "blockvault man (generating the man pages)"
[ -s "$MAN_DIR/blockvault.1" ] || fail "blockvault man wrote no blockvault.1"
command -v man >/dev/null || apt_install man-db
man -l "$MAN_DIR/blockvault.1" >"$WORK/man.txt" 2>"$WORK/man.err" || { cat "$WORK/man.err" >&2; fail "man -l blockvault.1"; }
grep -q 'blockvault-backup' "$WORK/man.txt" || fail "man -l blockvault.1: no subcommand listed"
gzip -9n "$MAN_DIR"/*.1 || fail "gzip of the man pages"
if ! cargo deb -p blockvault --no-build --fast >"$WORK/cargo-deb.out" 2>"$WORK/cargo-deb.err"; then
    tail -n 40 "$WORK/cargo-deb.err" >&2
    fail "cargo deb -p blockvault (build)"
fi
DEB=$(tail -n 1 "$WORK/cargo-deb.out")
[ -f "$DEB" ] || fail "cargo deb printed no .deb path (got '$DEB')"
echo "   $DEB ($(du -h "$DEB" | cut -f1))"

# --- 3. contents ---------------------------------------------------------------
step "3. dpkg -c / control fields"
dpkg -c "$DEB" >"$WORK/contents" || fail "dpkg -c $DEB"
# "mode path" for every regular file, e.g. "-rw------- ./etc/blockvault/config.toml"
awk '{ print $1, $NF }' "$WORK/contents" >"$WORK/modes"
expect_file() {
    grep -qxF -- "$1 ./$2" "$WORK/modes" || {
        cat "$WORK/contents" >&2
        fail "dpkg -c: expected $2 with mode $1"
    }
}
expect_file -rwxr-xr-x usr/bin/blockvault
for unit in "${UNIT_FILES[@]}"; do
    expect_file -rw-r--r-- "lib/systemd/system/$unit"
done
expect_file -rw------- etc/blockvault/config.toml
expect_file -rw-r--r-- usr/share/doc/blockvault/examples/config.example.toml
# cargo-deb compresses the changelog, as Debian policy asks
expect_file -rw-r--r-- usr/share/doc/blockvault/changelog.gz
# man pages generated from clap (issue 14 item 12)
expect_file -rw-r--r-- usr/share/man/man1/blockvault.1.gz
expect_file -rw-r--r-- usr/share/man/man1/blockvault-backup.1.gz
# no debug symbols in the package (issue 14 item 12)
if grep -E '\./usr/lib/debug/|\.debug$' "$WORK/contents"; then
    fail "dpkg -c: the package ships debug symbols"
fi
# nor inside the binary: a stripped release binary is a few MB, with debug info ~80 MB
bin_size=$(awk '$NF == "./usr/bin/blockvault" {print $3}' "$WORK/contents")
[ -n "$bin_size" ] && [ "$bin_size" -lt 40000000 ] || fail "dpkg -c: usr/bin/blockvault is $bin_size bytes: not stripped of debug info"
# the shipped config backs up nothing
if grep -qE '^\[\[image\]\]' packaging/config.toml; then
    fail "packaging/config.toml configures an image"
fi

dpkg-deb --info "$DEB" conffiles >"$WORK/conffiles" 2>/dev/null || true
grep -qxF /etc/blockvault/config.toml "$WORK/conffiles" \
    || fail "control: /etc/blockvault/config.toml is not a conffile"
DEPENDS=$(dpkg-deb --field "$DEB" Depends)
RECOMMENDS=$(dpkg-deb --field "$DEB" Recommends)
echo "   Depends: $DEPENDS"
echo "   Recommends: $RECOMMENDS"
[ -n "$DEPENDS" ] || fail "control: empty Depends (expected at least libc6)"
case "$DEPENDS" in
*librbd* | *librados*) fail "control: librbd/librados must not be in Depends (loaded with dlopen)" ;;
esac
case "$RECOMMENDS" in
*librbd1*librados2* | *librados2*librbd1*) ;;
*) fail "control: Recommends must list librbd1 and librados2" ;;
esac
for script in postinst prerm postrm; do
    dpkg-deb --info "$DEB" "$script" >/dev/null 2>&1 || fail "control: maintainer script $script missing"
done

# --- 4. install ------------------------------------------------------------------
step "4. dpkg -i"
# dpkg has no lock timeout: retry a few times if another install holds it.
installed=
for _ in 1 2 3 4 5 6; do
    if dpkg -i --force-confdef --force-confold "$DEB" >"$WORK/dpkg.out" 2>&1; then
        installed=1
        break
    fi
    grep -qi 'lock' "$WORK/dpkg.out" || break
    sleep 10
done
[ -n "$installed" ] || {
    cat "$WORK/dpkg.out" >&2
    fail "dpkg -i $DEB"
}
[ "$(dpkg-query -W -f '${db:Status-Status}' blockvault)" = installed ] \
    || fail "dpkg -i: package blockvault not in state 'installed'"
mode=$(stat -c '%a %U' /etc/blockvault/config.toml 2>/dev/null) || fail "/etc/blockvault/config.toml not installed"
[ "$mode" = "600 root" ] || fail "/etc/blockvault/config.toml has mode/owner '$mode', expected '600 root'"
mode=$(stat -c '%a %U' /var/lib/blockvault 2>/dev/null) || fail "/var/lib/blockvault not created by postinst"
[ "$mode" = "700 root" ] || fail "/var/lib/blockvault has mode/owner '$mode', expected '700 root'"
/usr/bin/blockvault --version >/dev/null 2>&1 || fail "installed /usr/bin/blockvault --version does not run"
if command -v man >/dev/null; then
    man -P cat blockvault 2>/dev/null | grep -q 'blockvault' || fail "man blockvault: the installed page does not show"
fi
verify_units "installed units" "${VERIFY_UNITS[@]}"

# --- 5. removal --------------------------------------------------------------------
if [ "${BLOCKVAULT_KEEP_INSTALLED:-}" = 1 ]; then
    step "5. skipped (BLOCKVAULT_KEEP_INSTALLED=1): blockvault stays installed"
else
    # Don't leave a stale /usr/bin/blockvault on PATH for other tests.
    step "5. dpkg --purge"
    dpkg --purge blockvault >"$WORK/dpkg.out" 2>&1 || {
        cat "$WORK/dpkg.out" >&2
        fail "dpkg --purge blockvault"
    }
    [ ! -e /usr/bin/blockvault ] || fail "dpkg --purge left /usr/bin/blockvault"
    [ -d /var/lib/blockvault ] || fail "dpkg --purge removed /var/lib/blockvault (the store must survive)"
fi

step "packaging check passed"
