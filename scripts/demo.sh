#!/usr/bin/env bash
# Cairn's main job on the embedded default, a local directory repository:
# build, create a repository, push a directory (default: /usr/share), push it again
# (incremental), list the snapshots and the top of the newest one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p cairn-cli
CAIRN=target/release/cairn
SRC=${1:-/usr/share}
export CAIRN_REPO=${CAIRN_REPO:-$PWD/demo-repo}
[ -e "$CAIRN_REPO/config" ] || $CAIRN init
$CAIRN push "$SRC" --tag demo=1
$CAIRN push "$SRC" --tag demo=2
$CAIRN snapshots
$CAIRN ls latest:/
$CAIRN stats
