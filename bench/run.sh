#!/usr/bin/env bash
# Whole-process benchmark: cairn against restic and against physical baselines (tar, b3sum,
# zstd, cp) on real datasets, one run, everything measured with the page cache warm.
# Writes a markdown report (default docs/benchmarks.md). See bench/README.md.
#
# Environment:
#   CAIRN           cairn binary            (default: target/release/cairn)
#   BENCHDATA       directory holding fs-v1 fs-v2 mem-v1 mem-v2 (default: ./benchdata)
#   DATASET_SCRIPT  if the datasets are missing, run this (with BENCHDATA exported) to build them
#   OUT             report path             (default: docs/benchmarks.md)
#   BENCH_TMP       where repositories, restores and copies go (default: $BENCHDATA, so they
#                   are on the same disk as the data); a fresh temp dir is made and removed
#   BENCH_GROUPS    groups to run           (default: "fs mem mount gc volume"; mount = bench/mount.py,
#                   needs root; gc = bench/gc.py; volume = bench/volume.py, needs root)
#   SKIP_RESTIC=1   do not run restic;  SKIP_BASELINES=1  do not run the physical baselines
#   RESTORE_RUNS    restores per tool and dataset, the median is reported (default 3)
#   PUSH_RUNS       first + incremental push pairs per tool and dataset, each into a fresh
#                   repository; the medians are reported (default 3)
#
# The fs group also runs the "in place" scenario: fs-v1 is copied to a work dir W and pushed,
# then W is updated to fs-v2 with rsync and pushed again at the same path (parent picked by
# the tool). Needs rsync (installed with apt-get when running as root).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE="$ROOT/bench"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
abspath() { # absolute path without requiring it to exist
  case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$PWD" "$1" ;; esac
}

CAIRN=$(abspath "${CAIRN:-$ROOT/target/release/cairn}")
BENCHDATA=$(abspath "${BENCHDATA:-$ROOT/benchdata}")
OUT=$(abspath "${OUT:-$ROOT/docs/benchmarks.md}")
GROUPS_TO_RUN=${BENCH_GROUPS:-fs mem mount gc volume}
SKIP_RESTIC=${SKIP_RESTIC:-0}
SKIP_BASELINES=${SKIP_BASELINES:-0}
RESTORE_RUNS=${RESTORE_RUNS:-3}
PUSH_RUNS=${PUSH_RUNS:-3}
case $RESTORE_RUNS in ''|*[!0-9]*|0) die "RESTORE_RUNS=$RESTORE_RUNS is not a positive number" ;; esac
case $PUSH_RUNS in ''|*[!0-9]*|0) die "PUSH_RUNS=$PUSH_RUNS is not a positive number" ;; esac
export RESTIC_PASSWORD=bench

# ---------------------------------------------------------------- prerequisites
for g in $GROUPS_TO_RUN; do
  case $g in fs|mem|mount|gc|volume) ;; *) die "unknown group '$g' in BENCH_GROUPS (fs, mem, mount, gc, volume)" ;; esac
done
[ -x "$CAIRN" ] || die "cairn binary not found at $CAIRN: build it: cargo build --release -p cairn-cli (or set CAIRN=/path/to/cairn)"
command -v python3 >/dev/null || die "python3 is needed (JSON parsing and bench/table.py)"
if [ ! -x /usr/bin/time ]; then
  log "/usr/bin/time missing: installing the 'time' package"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q time >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q time >/dev/null; } \
      || die "could not install 'time'"
  else
    die "/usr/bin/time (GNU time) is needed: apt-get install time"
  fi
fi

HAVE_RESTIC=0
if [ "$SKIP_RESTIC" != 1 ] && command -v restic >/dev/null; then HAVE_RESTIC=1; fi

HAVE_RSYNC=0 # for the in-place scenario of the fs group; without it that scenario is skipped
case " $GROUPS_TO_RUN " in
  *" fs "*)
    if ! command -v rsync >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "rsync missing: installing the 'rsync' package (for the in-place scenario)"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q rsync >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q rsync >/dev/null; } \
        || log "warning: could not install rsync; the in-place scenario will be skipped"
    fi
    if command -v rsync >/dev/null; then HAVE_RSYNC=1
    else log "warning: rsync not found; the in-place scenario will be skipped"; fi ;;
esac

datasets_missing() {
  local m=()
  [ -d "$BENCHDATA/fs-v1" ] || m+=(fs-v1)
  [ -d "$BENCHDATA/fs-v2" ] || m+=(fs-v2)
  [ -f "$BENCHDATA/mem-v1" ] || m+=(mem-v1)
  [ -f "$BENCHDATA/mem-v2" ] || m+=(mem-v2)
  echo "${m[*]:-}"
}
missing=$(datasets_missing)
if [ -n "$missing" ]; then
  if [ -n "${DATASET_SCRIPT:-}" ]; then
    log "datasets missing in $BENCHDATA ($missing): building them with $DATASET_SCRIPT"
    mkdir -p "$BENCHDATA"
    if [ -x "$DATASET_SCRIPT" ]; then BENCHDATA="$BENCHDATA" "$DATASET_SCRIPT"
    else BENCHDATA="$BENCHDATA" bash "$DATASET_SCRIPT"; fi
    missing=$(datasets_missing)
    [ -z "$missing" ] || die "$DATASET_SCRIPT ran but $BENCHDATA still lacks: $missing"
  else
    die "datasets missing in $BENCHDATA: $missing.
  set BENCHDATA to a directory holding fs-v1 fs-v2 mem-v1 mem-v2 (see bench/README.md),
  or set DATASET_SCRIPT to a script that builds them into \$BENCHDATA"
  fi
fi

# ---------------------------------------------------------------- work dir + cleanup
BENCH_TMP=$(abspath "${BENCH_TMP:-$BENCHDATA}")
[ -d "$BENCH_TMP" ] && [ -w "$BENCH_TMP" ] || die "BENCH_TMP=$BENCH_TMP is not a writable directory (set BENCH_TMP to one on the same disk as the data)"
WORK=$(mktemp -d "$BENCH_TMP/.cairn-bench.XXXXXX")
cleanup() {
  local rc=$?
  if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
    rm -rf -- "$WORK" 2>/dev/null || { chmod -R u+rwx -- "$WORK" 2>/dev/null; rm -rf -- "$WORK"; } || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
LOG="$WORK/log"; mkdir -p "$LOG"
RES="$WORK/results.tsv"; : >"$RES"
FAILED=0

rec() { # rec KEY VALUE  (one line per key; newlines escaped, tabs -> spaces)
  local v=${2//$'\t'/ }
  v=${v//\\/\\\\}
  printf '%s\t%s\n' "$1" "${v//$'\n'/\\n}" >>"$RES"
}

# measure KEY CMD...: run CMD once under GNU time; stdout -> $LOG/KEY.out, stderr -> $LOG/KEY.err.
# Records KEY.s (elapsed), KEY.rss_kib (peak RSS) and KEY.rc. Returns CMD's status.
measure() {
  local key=$1; shift
  local tf="$LOG/$key.time" rc=0
  log "run   $key: $*"
  /usr/bin/time -f '%e %M' -o "$tf" "$@" >"$LOG/$key.out" 2>"$LOG/$key.err" || rc=$?
  local line; line=$(tail -n 1 "$tf" 2>/dev/null || true)
  rec "$key.s" "${line%% *}"
  rec "$key.rss_kib" "${line##* }"
  rec "$key.rc" "$rc"
  if [ "$rc" -ne 0 ]; then
    FAILED=$((FAILED + 1))
    rec "$key.error" "$(tail -n 5 "$LOG/$key.err")"
    log "FAIL  $key (exit $rc): $(tail -n 3 "$LOG/$key.err")"
  else
    log "done  $key: ${line%% *} s, peak RSS ${line##* } KiB"
  fi
  sync # let writeback of this step finish before the next one starts (not measured)
  return "$rc"
}

skip() { rec "$1.skipped" "$2"; log "skip  $1: $2"; }

median() { # median NUMBER... (the lower middle one for an even count)
  printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'
}

recorded() { # recorded KEY : the last value recorded for KEY (empty if none)
  awk -F'\t' -v k="$1" '$1 == k { v = $2 } END { print v }' "$RES"
}

# settle PATH... : flush and drop the kernel's caches, then read PATHs (the tool's repository
# and cache) back in. Dropping the caches also makes ext4 forget which inodes were deleted
# recently: it remembers them only while their inode table blocks are cached, and skipping
# them made a restore after a mass deletion 2-4x slower, for minutes. Needs root.
settle() {
  sync
  [ "$(id -u)" = 0 ] && echo 3 2>/dev/null >/proc/sys/vm/drop_caches || return 1
  local p; for p in "$@"; do if [ -e "$p" ]; then warm "$p"; fi; done
}

# restores KEY RUNS TARGET VERIFY_SRC VERIFY_SUBPATH WARM CMD... : restore RUNS times, each into a
# fresh TARGET.N (CMD gets it appended), and record KEY.s as the median time, KEY.rss_kib as
# the largest peak RSS, KEY.rc as the first failure. The runs' own values stay recorded as
# KEY.runN.*. Restore time on this kind of disk varies run to run by 2x and more: ext4 skips
# inodes deleted in the last minute when allocating, at a cost that grows with how many were
# deleted, so one run says little. For the same reason nothing the run writes (restores,
# repositories, copies) is deleted before it ends: a deletion would slow whichever step
# comes next. A run started right after another one's cleanup is slowed the same way;
# wait a minute between runs.
restores() {
  local key=$1 runs=$2 target=$3 vsrc=$4 vsub=$5 warm_paths=$6; shift 6
  local r rc=0 first_rc=0 times=() rss=0 settled=yes
  local -a wp; IFS=: read -r -a wp <<<"$warm_paths"
  for r in $(seq 1 "$runs"); do
    mkdir -p "$target.$r"
    settle "${wp[@]}" || settled=no
    rc=0; measure "$key.run$r" "$@" "$target.$r" || rc=$?
    if [ "$rc" -eq 0 ]; then
      verify "$key.run$r" "$vsrc" "$target.$r${vsub:+/$vsub}"
      times+=("$(recorded "$key.run$r.s")")
      local m; m=$(recorded "$key.run$r.rss_kib"); [ "${m:-0}" -gt "$rss" ] && rss=$m
    elif [ "$first_rc" -eq 0 ]; then first_rc=$rc; fi
  done
  rec "$key.rc" "$first_rc"
  rec "$key.settled" "$settled"
  if [ "${#times[@]}" -gt 0 ]; then
    rec "$key.s" "$(median "${times[@]}")"
    rec "$key.rss_kib" "$rss"
    rec "$key.runs" "${times[*]}"
    rec "$key.verify" "$(recorded "$key.run1.verify")"
  fi
  [ "$first_rc" -eq 0 ]
}

jget() { # jget FILE a.b.c : a field of a JSON document
  python3 - "$1" "$2" <<'EOF'
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split('.'):
    v = v[k]
print(v)
EOF
}

restic_snapshot_id() { # the snapshot id from `restic backup --json` output
  python3 - "$1" <<'EOF'
import json, sys
sid = None
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith('{'):
        continue
    try:
        d = json.loads(line)
    except ValueError:
        continue
    if d.get('message_type') == 'summary':
        sid = d.get('snapshot_id')
if not sid:
    sys.exit(1)
print(sid)
EOF
}

cairn_push_json() { # cairn_push_json FILE KEY : record fields of `cairn push --json` output
  [ -s "$1" ] || return 0
  python3 - "$1" "$2" >>"$RES" <<'EOF' || true
import json, sys
d = json.load(open(sys.argv[1])); k = sys.argv[2]
s = d.get('stats', {})
for f in ('bytes', 'bytes_read', 'files', 'new_chunks', 'new_bytes', 'stored_bytes'):
    if f in s: print(f"{k}.json.{f}\t{s[f]}")
for f in ('snapshot', 'files_unchanged', 'packs', 'seconds', 'parent'):
    if f in d: print(f"{k}.json.{f}\t{d[f]}")
EOF
}

restic_push_json() { # restic_push_json FILE KEY : record the summary of `restic backup --json`
  [ -s "$1" ] || return 0
  python3 - "$1" "$2" >>"$RES" <<'EOF' || true
import json, sys
for line in open(sys.argv[1]):
    try:
        d = json.loads(line)
    except ValueError:
        continue
    if d.get('message_type') == 'summary':
        for f in ('data_added', 'files_new', 'files_changed', 'files_unmodified', 'total_duration', 'snapshot_id'):
            if f in d: print(f"{sys.argv[2]}.json.{f}\t{d[f]}")
EOF
}

du_bytes() { if [ -e "$1" ]; then du -sb "$1" | cut -f1; else echo 0; fi; }
logical_bytes() { du -sb --apparent-size "$1" | cut -f1; }
tree_summary() { # "F files, B bytes, L symlinks, D dirs" for a file or a directory
  find "$1" -printf '%y %s\n' | awk '
    $1=="f"{f++; b+=$2} $1=="l"{l++} $1=="d"{d++}
    END{printf "%d files, %d bytes, %d symlinks, %d dirs\n", f, b, l, d}'
}
verify() { # verify KEY SOURCE RESTORED : compare counts and sizes (cmp for single files)
  local key=$1 src=$2 dst=$3 a b
  if [ ! -e "$dst" ]; then rec "$key.verify" "restored data not found at $dst"; FAILED=$((FAILED + 1)); return; fi
  if [ -f "$src" ]; then
    if cmp -s "$src" "$dst"; then rec "$key.verify" "ok (identical bytes)"
    else rec "$key.verify" "MISMATCH: restored file differs"; FAILED=$((FAILED + 1)); fi
    return
  fi
  a=$(tree_summary "$src"); b=$(tree_summary "$dst")
  if [ "$a" = "$b" ]; then rec "$key.verify" "ok ($a)"
  else rec "$key.verify" "MISMATCH: source $a; restored $b"; FAILED=$((FAILED + 1)); fi
}

warm() { # read a dataset fully through a pipe (tar to /dev/null directly would skip the reads)
  log "warm  $1"
  if [ -d "$1" ]; then tar cf - -C "$1" . | cat >/dev/null
  else cat "$1" | cat >/dev/null; fi
}

tar_src() { # tar arguments that archive a directory's contents or a single file
  if [ -d "$1" ]; then printf '%s\0%s\0%s\0' -C "$1" .
  else printf '%s\0%s\0%s\0' -C "$(dirname "$1")" "$(basename "$1")"; fi
}

# ---------------------------------------------------------------- machine + datasets
rec meta.date "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
rec meta.host "$(hostname 2>/dev/null || echo '?')"
rec meta.nproc "$(nproc)"
rec meta.restore_runs "$RESTORE_RUNS"
rec meta.push_runs "$PUSH_RUNS"
rec meta.cpu "$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)"
rec meta.kernel "$(uname -srm)"
rec meta.free "$(free -g)"
commit=$(git -C "$ROOT" rev-parse --verify -q HEAD 2>/dev/null || echo "no commit yet")
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null || true)" ]; then commit="$commit (uncommitted changes)"; fi
rec meta.commit "$commit"
rec meta.cairn_bin "$CAIRN"
rec meta.cairn_version "$("$CAIRN" --version 2>&1 | head -n 1)"
case $CAIRN in */debug/*) rec meta.debug_build yes ;; *) rec meta.debug_build no ;; esac
rec meta.restic "$HAVE_RESTIC"
if [ "$HAVE_RESTIC" = 1 ]; then rec meta.restic_version "$(restic version 2>&1 | head -n 1)"; fi
rec meta.tools "$(tar --version | head -n 1); $(zstd --version 2>/dev/null | head -n 1 || echo 'zstd missing'); $(b3sum --version 2>/dev/null || echo 'b3sum missing')"
rec meta.benchdata "$BENCHDATA"
rec meta.workdir_fs "$(df -T "$WORK" | awk 'NR==2{print $2" on "$1}')"
rec meta.same_disk "$([ "$(stat -c %d "$WORK")" = "$(stat -c %d "$BENCHDATA/fs-v1")" ] && echo yes || echo no)"
rec meta.groups "$GROUPS_TO_RUN"

total=0
for ds in fs-v1 fs-v2 mem-v1 mem-v2; do
  p="$BENCHDATA/$ds"
  b=$(logical_bytes "$p"); total=$((total + b))
  rec "ds.$ds.bytes" "$b"
  rec "ds.$ds.disk" "$(du_bytes "$p")"
  rec "ds.$ds.summary" "$(tree_summary "$p")"
done
avail=$(df -B1 --output=avail "$WORK" | tail -n 1 | tr -d ' ')
if [ "$avail" -lt $((total * 6)) ]; then
  log "warning: only $avail bytes free under $BENCH_TMP for about $((total * 6)) bytes of repositories, restores and copies (all kept until the end)"
fi

# ---------------------------------------------------------------- repeated pushes
# more_pushes TOOL GROUP V1 V2 KIND : PUSH_RUNS - 1 more first and incremental pushes, each pair
# into a fresh repository and cache of its own (recorded as KEY.runN), then KEY.s of push1 and
# push2 becomes the median of all runs (the first run's repository is the one measured for
# stored bytes and restored from). A single push of this size varied 0.59-0.86 s here.
more_pushes() {
  local tool=$1 g=$2 v1=$3 v2=$4 kind=$5 k="$1.$2" r id key
  for r in $(seq 2 "$PUSH_RUNS"); do
    local repo="$WORK/$tool-$g-repo.$r" cache="$WORK/$tool-$g-cache.$r" id=""
    local -a run
    if [ "$tool" = cairn ]; then
      run=(env "CAIRN_REPO=$repo" "CAIRN_CACHE_DIR=$cache" "$CAIRN")
      "${run[@]}" init >/dev/null 2>&1 || { log "skip  $k.push run $r: init failed"; continue; }
      sync
      measure "$k.push1.run$r" "${run[@]}" push "$v1" --kind "$kind" --parent none --json &&
        id=$(jget "$LOG/$k.push1.run$r.out" snapshot || true)
      [ -n "$id" ] && measure "$k.push2.run$r" "${run[@]}" push "$v2" --kind "$kind" --parent "$id" --json
    else
      run=(restic -r "$repo" --cache-dir "$cache")
      "${run[@]}" init >/dev/null 2>&1 || { log "skip  $k.push run $r: init failed"; continue; }
      sync
      measure "$k.push1.run$r" "${run[@]}" backup --json "$v1" &&
        id=$(restic_snapshot_id "$LOG/$k.push1.run$r.out" || true)
      [ -n "$id" ] && measure "$k.push2.run$r" "${run[@]}" backup --json --parent "$id" "$v2"
    fi
  done
  for key in "$k.push1" "$k.push2"; do
    local times=()
    [ "$(recorded "$key.rc")" = 0 ] && times+=("$(recorded "$key.s")")
    for r in $(seq 2 "$PUSH_RUNS"); do
      [ "$(recorded "$key.run$r.rc")" = 0 ] && times+=("$(recorded "$key.run$r.s")")
    done
    [ "${#times[@]}" -gt 1 ] || continue
    rec "$key.runs" "${times[*]}"
    rec "$key.s" "$(median "${times[@]}")"
  done
}

# ---------------------------------------------------------------- cairn
cairn_group() { # cairn_group GROUP V1 V2 KIND
  local g=$1 v1=$2 v2=$3 kind=$4 k="cairn.$1"
  local repo="$WORK/cairn-$g-repo" cache="$WORK/cairn-$g-cache" target="$WORK/restore-cairn-$g"
  local -a cairn=(env "CAIRN_REPO=$repo" "CAIRN_CACHE_DIR=$cache" "$CAIRN")
  local id1="" id2=""
  if ! "${cairn[@]}" init >"$LOG/$k.init.out" 2>&1; then
    rec "$k.init.error" "$(tail -n 5 "$LOG/$k.init.out")"; FAILED=$((FAILED + 1))
    skip "$k" "cairn init failed"; return
  fi
  if measure "$k.push1" "${cairn[@]}" push "$v1" --kind "$kind" --parent none --json; then
    id1=$(jget "$LOG/$k.push1.out" snapshot || true)
  fi
  rec "$k.push1.stored" "$(du_bytes "$repo")"
  if [ -n "$id1" ]; then
    if measure "$k.push2" "${cairn[@]}" push "$v2" --kind "$kind" --parent "$id1" --json; then
      id2=$(jget "$LOG/$k.push2.out" snapshot || true)
    fi
    rec "$k.push2.stored" "$(du_bytes "$repo")"
  else
    skip "$k.push2" "first push failed or printed no snapshot id"
  fi
  for step in push1 push2; do cairn_push_json "$LOG/$k.$step.out" "$k.$step"; done # details from the push JSON
  if [ -n "$id2" ]; then
    local sub=""; [ -f "$v2" ] && sub=$(basename "$v2")
    restores "$k.restore" "$RESTORE_RUNS" "$target" "$v2" "$sub" "$repo:$cache" "${cairn[@]}" restore "$id2" || true
  else
    skip "$k.restore" "incremental push failed or printed no snapshot id"
  fi
  if "${cairn[@]}" stats --json >"$LOG/$k.stats.json" 2>"$LOG/$k.stats.err"; then
    python3 - "$LOG/$k.stats.json" "$k" >>"$RES" <<'EOF' || true
import json, sys
d = json.load(open(sys.argv[1]))
for f, v in d.items():
    print(f"{sys.argv[2]}.stats.{f}\t{v}")
EOF
  fi
  rec "$k.cache_bytes" "$(du_bytes "$cache")"
  sync # nothing is deleted before the end of the run (see `restores`)
}

# ---------------------------------------------------------------- restic
restic_group() { # restic_group GROUP V1 V2
  local g=$1 v1=$2 v2=$3 k="restic.$1"
  local repo="$WORK/restic-$g-repo" cache="$WORK/restic-$g-cache" target="$WORK/restore-restic-$g"
  local -a restic=(restic -r "$repo" --cache-dir "$cache")
  local id1="" id2=""
  if ! restic init --repo "$repo" --cache-dir "$cache" >"$LOG/$k.init.out" 2>&1; then
    rec "$k.init.error" "$(tail -n 5 "$LOG/$k.init.out")"; FAILED=$((FAILED + 1))
    skip "$k" "restic init failed"; return
  fi
  if measure "$k.push1" "${restic[@]}" backup --json "$v1"; then
    id1=$(restic_snapshot_id "$LOG/$k.push1.out" || true)
  fi
  rec "$k.push1.stored" "$(du_bytes "$repo")"
  if [ -n "$id1" ]; then
    if measure "$k.push2" "${restic[@]}" backup --json --parent "$id1" "$v2"; then
      id2=$(restic_snapshot_id "$LOG/$k.push2.out" || true)
    fi
    rec "$k.push2.stored" "$(du_bytes "$repo")"
  else
    skip "$k.push2" "first backup failed or printed no snapshot id"
  fi
  for step in push1 push2; do restic_push_json "$LOG/$k.$step.out" "$k.$step"; done
  if [ -n "$id2" ]; then
    # restic restores under the full source path
    restores "$k.restore" "$RESTORE_RUNS" "$target" "$v2" "${v2#/}" "$repo:$cache" "${restic[@]}" restore "$id2" --target || true
  else
    skip "$k.restore" "incremental backup failed or printed no snapshot id"
  fi
  rec "$k.cache_bytes" "$(du_bytes "$cache")"
  sync # nothing is deleted before the end of the run (see `restores`)
}

# ---------------------------------------------------------------- in-place incremental push (fs)
tree_equal() { # tree_equal KEY EXPECTED DIR : `diff -rq --no-dereference` (contents and symlink
  # targets; special files of the same type count as equal), recorded as KEY.verify
  local key=$1 a=$2 b=$3 out rc=0
  out=$(diff -rq --no-dereference "$a" "$b" 2>&1) || rc=$?
  out=$(printf '%s\n' "$out" | grep -vE '^File .* is a (fifo|socket|character special file|block special file) while file .* is a \1$' | sed '/^$/d' || true)
  if [ "$rc" -le 1 ] && [ -z "$out" ]; then rec "$key.verify" "ok (diff -rq --no-dereference: no differences)"
  else
    rec "$key.verify" "MISMATCH: $(printf '%s\n' "$out" | wc -l) diff line(s), diff exit $rc; first: $(printf '%s\n' "$out" | head -n 3)"
    FAILED=$((FAILED + 1))
  fi
}

inplace() { # inplace TOOL : W = cp -a fs-v1; push W; rsync -a --delete fs-v2/ W/; push W again (measured)
  local tool=$1 k="$1.fs.inplace" v1="$BENCHDATA/fs-v1" v2="$BENCHDATA/fs-v2"
  local W="$WORK/inplace-$tool" repo="$WORK/inplace-$tool-repo" cache="$WORK/inplace-$tool-cache"
  local -a push
  local id1="" par="" step
  if [ "$tool" = cairn ]; then
    local -a cairn=(env "CAIRN_REPO=$repo" "CAIRN_CACHE_DIR=$cache" "$CAIRN")
    if ! "${cairn[@]}" init >"$LOG/$k.init.out" 2>&1; then
      rec "$k.init.error" "$(tail -n 5 "$LOG/$k.init.out")"; FAILED=$((FAILED + 1))
      skip "$k.push1" "cairn init failed"; skip "$k.push2" "cairn init failed"; return
    fi
    push=("${cairn[@]}" push "$W" --kind fs --json) # --parent auto (the default)
  else
    local -a restic=(restic -r "$repo" --cache-dir "$cache")
    if ! "${restic[@]}" init >"$LOG/$k.init.out" 2>&1; then
      rec "$k.init.error" "$(tail -n 5 "$LOG/$k.init.out")"; FAILED=$((FAILED + 1))
      skip "$k.push1" "restic init failed"; skip "$k.push2" "restic init failed"; return
    fi
    push=("${restic[@]}" backup --json "$W") # parent: latest snapshot of the same host and path
  fi
  rec "$k.workdir" "$W"
  log "setup $k: cp -a $v1 $W"
  if ! cp -a "$v1" "$W" 2>"$LOG/$k.cp.err"; then
    rec "$k.setup.error" "cp -a: $(tail -n 3 "$LOG/$k.cp.err")"; FAILED=$((FAILED + 1))
    skip "$k.push1" "cp -a of fs-v1 failed"; skip "$k.push2" "cp -a of fs-v1 failed"
    return
  fi
  sync; warm "$W"
  sleep 1.2 # cairn does not trust the change cache for files whose ctime is within 1 s of the push
  if measure "$k.push1" "${push[@]}"; then
    if [ "$tool" = cairn ]; then id1=$(jget "$LOG/$k.push1.out" snapshot || true)
    else id1=$(restic_snapshot_id "$LOG/$k.push1.out" || true); fi
  fi
  rec "$k.push1.stored" "$(du_bytes "$repo")"
  if [ -z "$id1" ]; then
    skip "$k.push2" "first push failed or printed no snapshot id"
  else
    log "setup $k: rsync -a --delete $v2/ $W/"
    if ! rsync -a --delete "$v2/" "$W/" 2>"$LOG/$k.rsync.err"; then
      rec "$k.setup.error" "rsync: $(tail -n 3 "$LOG/$k.rsync.err")"; FAILED=$((FAILED + 1))
      skip "$k.push2" "rsync of fs-v2 over the work dir failed"
    else
      sync; warm "$W"
      sleep 1.2
      if measure "$k.push2" "${push[@]}"; then
        if [ "$tool" = cairn ]; then
          par=$(jget "$LOG/$k.push2.out" parent || true); [ "$par" != None ] || par=""
        else # restic's summary has no parent: read it from the newest snapshot
          par=$("${restic[@]}" snapshots --json 2>/dev/null | python3 -c '
import json, sys
s = sorted(json.load(sys.stdin), key=lambda x: x["time"])
print(s[-1].get("parent", "") if s else "")' || true)
        fi
        rec "$k.push2.parent" "${par:-none}"
        if [ -n "$par" ] && { [ "$par" = "$id1" ] || [ "${id1#"$par"}" != "$id1" ] || [ "${par#"$id1"}" != "$par" ]; }; then
          rec "$k.push2.parent_is_push1" yes
        else rec "$k.push2.parent_is_push1" no; fi
      fi
      rec "$k.push2.stored" "$(du_bytes "$repo")"
      tree_equal "$k.tree" "$v2" "$W"
    fi
  fi
  for step in push1 push2; do
    if [ "$tool" = cairn ]; then cairn_push_json "$LOG/$k.$step.out" "$k.$step"
    else restic_push_json "$LOG/$k.$step.out" "$k.$step"; fi
  done
  rec "$k.cache_bytes" "$(du_bytes "$cache")"
  sync
}

# ---------------------------------------------------------------- physical baselines
baselines() { # baselines DATASET
  local ds=$1 p="$BENCHDATA/$1" k="base.$1"
  local -a src; mapfile -d '' src < <(tar_src "$p")
  measure "$k.read" bash -o pipefail -c 'tar cf - "$@" | cat >/dev/null' _ "${src[@]}" || true
  if command -v b3sum >/dev/null; then
    measure "$k.b3sum" bash -o pipefail -c 'find "$1" -type f -print0 | xargs -0 cat | b3sum >/dev/null' _ "$p" || true
  else skip "$k.b3sum" "b3sum not installed"; fi
  if command -v zstd >/dev/null; then
    measure "$k.zstd1" bash -o pipefail -c 'tar cf - "$@" | zstd -1 -T1 -c >/dev/null' _ "${src[@]}" || true
    measure "$k.zstd3" bash -o pipefail -c 'tar cf - "$@" | zstd -3 -T1 -c >/dev/null' _ "${src[@]}" || true
  else skip "$k.zstd1" "zstd not installed"; skip "$k.zstd3" "zstd not installed"; fi
  measure "$k.cp" cp -a "$p" "$WORK/cp-target-$1" || true
}

# ---------------------------------------------------------------- run
log "cairn: $CAIRN; data: $BENCHDATA; work dir: $WORK; restic: $([ "$HAVE_RESTIC" = 1 ] && echo yes || echo no)"
case $CAIRN in */debug/*) log "warning: this is a debug build; the numbers will not be representative" ;; esac
for g in $GROUPS_TO_RUN; do
  case $g in
    mount|gc|volume) continue ;;
    fs) v1="$BENCHDATA/fs-v1"; v2="$BENCHDATA/fs-v2"; kind=fs ;;
    mem) v1="$BENCHDATA/mem-v1"; v2="$BENCHDATA/mem-v2"; kind=memory ;;
  esac
  warm "$v1"; warm "$v2"
  cairn_group "$g" "$v1" "$v2" "$kind"
  warm "$v1"; warm "$v2" # the restores dropped the caches
  more_pushes cairn "$g" "$v1" "$v2" "$kind"
  if [ "$HAVE_RESTIC" = 1 ]; then
    warm "$v1"; warm "$v2"
    restic_group "$g" "$v1" "$v2"
    warm "$v1"; warm "$v2"
    more_pushes restic "$g" "$v1" "$v2" "$kind"
  fi
  if [ "$g" = fs ]; then # in place: one directory updated from fs-v1 to fs-v2, pushed twice
    if [ "$HAVE_RSYNC" = 1 ]; then
      warm "$v1"; warm "$v2"
      inplace cairn
      if [ "$HAVE_RESTIC" = 1 ]; then warm "$v1"; warm "$v2"; inplace restic; fi
    else
      rec fs.inplace.skipped "rsync not available"
    fi
  fi
  if [ "$SKIP_BASELINES" != 1 ]; then
    for ds in "$v1" "$v2"; do warm "$ds"; baselines "$(basename "$ds")"; done
  fi
done
rec meta.failed_steps "$FAILED"

mkdir -p "$(dirname "$OUT")"
python3 "$HERE/table.py" "$RES" "$OUT"
case " $GROUPS_TO_RUN " in
  *" mount "*)
    log "mount group: bench/mount.py (adds its section to $OUT)"
    CAIRN="$CAIRN" BENCHDATA="$BENCHDATA" OUT="$OUT" BENCH_TMP="$BENCH_TMP" SKIP_RESTIC="$SKIP_RESTIC" \
      python3 "$HERE/mount.py" >/dev/null || { log "FAIL  mount group"; FAILED=$((FAILED + 1)); } ;;
esac
case " $GROUPS_TO_RUN " in
  *" gc "*)
    log "gc group: bench/gc.py (adds its section to $OUT)"
    SYNTH="$ROOT/target/release/examples/synth_repo"
    [ -x "$SYNTH" ] || (cd "$ROOT" && cargo build --release -q -p cairn-gc --example synth_repo) || true
    CAIRN="$CAIRN" SYNTH="$SYNTH" BENCHDATA="$BENCHDATA" OUT="$OUT" BENCH_TMP="$BENCH_TMP" SKIP_RESTIC="$SKIP_RESTIC" \
      python3 "$HERE/gc.py" >/dev/null || { log "FAIL  gc group"; FAILED=$((FAILED + 1)); } ;;
esac
case " $GROUPS_TO_RUN " in
  *" volume "*)
    log "volume group: bench/volume.py (adds its section to $OUT)"
    CAIRN="$CAIRN" BENCHDATA="$BENCHDATA" OUT="$OUT" BENCH_TMP="$BENCH_TMP" \
      python3 "$HERE/volume.py" >/dev/null || { log "FAIL  volume group"; FAILED=$((FAILED + 1)); } ;;
esac
log "report written to $OUT"
cat "$OUT"
if [ "$FAILED" -gt 0 ]; then
  log "$FAILED step(s) failed or did not verify; see the report"
  exit 1
fi
