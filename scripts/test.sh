#!/usr/bin/env bash
# The whole test suite: unit and property tests of every crate, then the integration tests
# that run the real `cairn` binary against local repositories and a moto S3 server that the
# tests start on 127.0.0.1 (free port) and stop after, and mount real FUSE filesystems
# (/dev/fuse, fusermount3) of a real Debian root filesystem built by debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "test: installing debootstrap (the mount tests push a real Debian root filesystem)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap >&2 \
    || { echo "test: could not install debootstrap" >&2; exit 1; }
fi
# The volume tests run git, sqlite3 and python3 -m venv + pip inside writable mounts.
need=()
command -v git >/dev/null 2>&1 || need+=(git)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
python3 -c 'import ensurepip, venv, sqlite3' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "test: installing ${need[*]} (the volume tests run them in writable mounts)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2 \
    || { echo "test: could not install ${need[*]}" >&2; exit 1; }
fi
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null \
  || { echo "test: the kernel has no overlayfs: the writable volume mounts need it" >&2; exit 1; }
[ -e /dev/fuse ] || { echo "test: /dev/fuse is missing: the mount tests need FUSE (modprobe fuse)" >&2; exit 1; }
CAIRN_TEST_ROOTFS=$(bash scripts/testdata.sh)
export CAIRN_TEST_ROOTFS
cargo build --workspace --bins
cargo test --workspace -- --test-threads=2
