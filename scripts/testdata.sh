#!/usr/bin/env bash
# Build the real Debian root filesystem the mount tests push and run programs from:
# debootstrap --variant=minbase bookworm with python3, sqlite3 and git, into
# target/testdata/rootfs (kept between runs; delete it to rebuild). Prints its path.
# Needs root and the Debian archive (the mirror is taken from this machine's apt sources).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${CAIRN_TEST_ROOTFS:-$PWD/target/testdata/rootfs}
if [ -e "$OUT.done" ]; then echo "$OUT"; exit 0; fi
command -v debootstrap >/dev/null || { echo "testdata: debootstrap is missing (scripts/setup.sh installs it)" >&2; exit 1; }
mirror=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
[ -n "$mirror" ] || mirror=$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
rm -rf "$OUT"; mkdir -p "$(dirname "$OUT")"
echo "testdata: debootstrap bookworm (minbase + python3 sqlite3 git) into $OUT from $mirror" >&2
if ! debootstrap --variant=minbase --include=python3,sqlite3,git bookworm "$OUT" "$mirror" >"$OUT.log" 2>&1; then
  echo "testdata: debootstrap failed (no access to the Debian archive?); last lines of $OUT.log:" >&2
  tail -5 "$OUT.log" >&2; exit 1
fi
touch "$OUT.done"
echo "$OUT"
