#!/usr/bin/env bash
# tests/ceph/install-deps.sh -- install what tests/ceph/start-cluster.sh and the RBD tests need
# (Debian/Ubuntu, as root or with sudo).  Idempotent: when every package is already installed
# it does nothing (no apt-get update), so repeated local runs are quick.
set -euo pipefail

PACKAGES=(ceph-mon ceph-osd ceph-mgr ceph-common librbd-dev librados-dev python3-rbd python3-rados radosgw)

missing=()
for p in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all of ${PACKAGES[*]} already installed" >&2
  exit 0
fi

SUDO=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-deps: need root (or sudo) to install ${missing[*]}" >&2; exit 1; }
  SUDO=(sudo)
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
