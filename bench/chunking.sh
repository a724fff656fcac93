#!/usr/bin/env bash
# Measures chunk sizes on real data and writes docs/chunking.md (override with OUT).
# For each size: a fresh repository, push version 1, push version 2 (parent = version 1),
# then record chunk counts, how much of version 2 was already stored, index and metadata
# bytes, and stored bytes. Needs BENCHDATA with fs-v1 fs-v2 mem-v1 mem-v2 (bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
CAIRN=${CAIRN:-$PWD/target/release/cairn}
BENCHDATA=${BENCHDATA:-$PWD/benchdata}
OUT=${OUT:-docs/chunking.md}
[ -x "$CAIRN" ] || { echo "no cairn binary at $CAIRN: cargo build --release -p cairn-cli" >&2; exit 1; }
for d in fs-v1 fs-v2 mem-v1 mem-v2; do
  [ -e "$BENCHDATA/$d" ] || { echo "missing $BENCHDATA/$d; set BENCHDATA (see bench/README.md)" >&2; exit 1; }
done
WORK=$(mktemp -d "${BENCH_TMP:-$BENCHDATA}/.cairn-chunking.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

measure() { # kind v1 v2 init-flags...
  local kind=$1 v1=$2 v2=$3; shift 3
  local repo=$WORK/repo cache=$WORK/cache
  rm -rf "$repo" "$cache"
  CAIRN_REPO=$repo CAIRN_CACHE_DIR=$cache "$CAIRN" init "$@" >/dev/null
  local a b
  a=$(CAIRN_REPO=$repo CAIRN_CACHE_DIR=$cache "$CAIRN" push --json --kind "$kind" "$v1" 2>/dev/null)
  local id1; id1=$(echo "$a" | json 'd["snapshot"]')
  b=$(CAIRN_REPO=$repo CAIRN_CACHE_DIR=$cache "$CAIRN" push --json --kind "$kind" --parent "$id1" "$v2" 2>/dev/null)
  local stats; stats=$(CAIRN_REPO=$repo CAIRN_CACHE_DIR=$cache "$CAIRN" stats --json)
  local index_bytes; index_bytes=$(du -sb "$repo/index" | cut -f1)
  local total; total=$(du -sb "$repo" | cut -f1)
  local c1 c2 new2 bytes2 stored1 stored2
  c1=$(echo "$a" | json 'd["stats"]["chunks"]'); c2=$(echo "$b" | json 'd["stats"]["chunks"]')
  new2=$(echo "$b" | json 'd["stats"]["new_bytes"]'); bytes2=$(echo "$b" | json 'd["stats"]["bytes"]')
  stored1=$(echo "$a" | json 'd["stats"]["stored_bytes"]'); stored2=$(echo "$b" | json 'd["stats"]["stored_bytes"]')
  local meta; meta=$(echo "$stats" | json 'd["meta_packs"]')
  python3 - "$c1" "$c2" "$new2" "$bytes2" "$stored1" "$stored2" "$index_bytes" "$total" "$meta" <<'PY' >> "$WORK/rows"
import sys
c1, c2, new2, bytes2, s1, s2, idx, total, meta = map(int, sys.argv[1:])
mb = lambda n: f"{n/1e6:.1f}"
print(f"{c1:,} | {c2:,} | {100*(1-new2/max(bytes2,1)):.1f}% | {mb(s1)} | {mb(s2)} | {mb(idx)} | {mb(total)}")
PY
  echo "$(tail -n1 "$WORK/rows")"
}

{
  echo "# Chunk sizes, measured"
  echo
  echo "Produced by \`bench/chunking.sh\` on $(date -u +%Y-%m-%d) ($(nproc) cores), cairn $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
  echo "Data: \`fs-v1\`/\`fs-v2\` (Debian bookworm minbase root filesystem before and after a sandbox"
  echo "session: $(du -sb --apparent-size "$BENCHDATA/fs-v1" | cut -f1) and $(du -sb --apparent-size "$BENCHDATA/fs-v2" | cut -f1) bytes), \`mem-v1\`/\`mem-v2\` (512 MiB qemu guest memory after boot and"
  echo "after a workload). Each row: a fresh repository, push v1, push v2 with v1 as parent."
  echo
  echo "- *v2 already stored*: share of v2's plain bytes that were found in the repository (dedup)."
  echo "- *index*: bytes of \`index/\` (the chunk index every host loads into its cache)."
  echo "- *total*: the whole repository after both pushes (packs + index + roots)."
  echo
} > "$WORK/head"

: > "$WORK/rows"
echo "## Files (content-defined, FastCDC 2020; min = avg/4, max = 4 x avg)" > "$WORK/body"
echo >> "$WORK/body"
echo "| avg chunk | chunks v1 | chunks v2 | v2 already stored | stored v1 MB | new stored v2 MB | index MB | total MB |" >> "$WORK/body"
echo "|---|---|---|---|---|---|---|---|" >> "$WORK/body"
for avg in 65536 262144 1048576; do
  row=$(measure fs "$BENCHDATA/fs-v1" "$BENCHDATA/fs-v2" --fs-chunk-avg "$avg")
  echo "| $((avg / 1024)) KiB | $row |" >> "$WORK/body"
done
echo >> "$WORK/body"
echo "## Memory images (fixed, page-aligned; all-zero chunks are holes)" >> "$WORK/body"
echo >> "$WORK/body"
echo "| chunk | chunks v1 | chunks v2 | v2 already stored | stored v1 MB | new stored v2 MB | index MB | total MB |" >> "$WORK/body"
echo "|---|---|---|---|---|---|---|---|" >> "$WORK/body"
for size in 4096 16384 65536 262144 2097152; do
  row=$(measure memory "$BENCHDATA/mem-v1" "$BENCHDATA/mem-v2" --memory-cut fixed --memory-chunk "$size")
  echo "| $((size / 1024)) KiB | $row |" >> "$WORK/body"
done
mkdir -p "$(dirname "$OUT")"
cat "$WORK/head" "$WORK/body" > "$OUT"
[ -f docs/chunking-notes.md ] && cat docs/chunking-notes.md >> "$OUT"
echo "wrote $OUT" >&2
