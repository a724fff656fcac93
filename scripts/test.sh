#!/usr/bin/env bash
# The whole test suite: unit and property tests of every crate, then the integration tests
# that run the real `cairn` binary against local repositories and a moto S3 server that the
# tests start on 127.0.0.1 (free port) and stop after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --bins
cargo test --workspace -- --test-threads=2
