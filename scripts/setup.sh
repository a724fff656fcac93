#!/usr/bin/env bash
# Installs what building and testing Cairn needs on a fresh Debian/Ubuntu machine:
# libclang-dev (RocksDB's bindgen), fuse3 (fusermount3), zstd/b3sum for the benchmarks'
# baselines, and moto_server (the S3-compatible server the tests run on 127.0.0.1).
# Says clearly what is missing when it cannot install it.
set -euo pipefail

need_apt=()
# libclang itself, not libclang-cpp (which other packages pull in and bindgen cannot use).
[ -n "$(ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
  /usr/lib/*-linux-gnu/libclang.so* /usr/lib/*-linux-gnu/libclang-[0-9]*.so* 2>/dev/null | head -n1)" ] \
  || need_apt+=(libclang-dev)
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-pip)

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "setup: missing Debian packages: ${need_apt[*]}; install them as root (apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "setup: installing ${need_apt[*]}" >&2
  $SUDO apt-get update -qq >&2 || { echo "setup: apt-get update failed (no network to Debian's archive?)" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >&2 \
    || { echo "setup: could not install ${need_apt[*]}" >&2; exit 1; }
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo (Rust toolchain) not found; install Rust from rustup.rs first" >&2
  exit 1
fi

if ! command -v moto_server >/dev/null 2>&1; then
  echo "setup: installing moto[server] from PyPI" >&2
  python3 -m pip install -q 'moto[server]' >&2 || { echo "setup: could not pip install moto[server]" >&2; exit 1; }
  hash -r
  command -v moto_server >/dev/null 2>&1 || { echo "setup: moto_server is not on PATH after install" >&2; exit 1; }
fi
