#!/usr/bin/env python3
"""GC benchmark: `cairn forget + gc` against `restic forget --prune` on the same data, and
`cairn gc` on synthetic repositories of 1M and 10M chunks (time, peak memory per live chunk).

Writes (or replaces) the "GC" section of docs/benchmarks.md between <!-- gc:begin --> and
<!-- gc:end -->. Needs a release build of cairn and of the generator
(`cargo build --release -p cairn-cli` and `cargo build --release -p cairn-gc --example
synth_repo`: one command with both would build only the example), rsync, GNU time,
and the datasets fs-v1 and fs-v2 in $BENCHDATA; restic when installed.

Environment: CAIRN, SYNTH (generator), BENCHDATA, OUT, BENCH_TMP, SKIP_RESTIC=1,
GC_SIZES (default "1000000 10000000").
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from section import write_section  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAIRN = os.path.abspath(os.environ.get("CAIRN", f"{ROOT}/target/release/cairn"))
SYNTH = os.path.abspath(os.environ.get("SYNTH", f"{ROOT}/target/release/examples/synth_repo"))
BENCHDATA = os.path.abspath(os.environ.get("BENCHDATA", f"{ROOT}/benchdata"))
OUT = os.path.abspath(os.environ.get("OUT", f"{ROOT}/docs/benchmarks.md"))
TMP = os.path.abspath(os.environ.get("BENCH_TMP", BENCHDATA))
SIZES = [int(x) for x in os.environ.get("GC_SIZES", "1000000 10000000").split()]


def log(msg):
    print(f"[gc-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(cmd, env=None):
    """Run under GNU time; return (seconds, peak RSS KiB, stdout)."""
    with tempfile.NamedTemporaryFile("r") as tf:
        p = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", tf.name, *cmd], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if p.returncode != 0:
            raise RuntimeError(f"{cmd} failed: {p.stderr.decode()[-500:]}")
        secs, rss = open(tf.name).read().split()[-2:]
        return float(secs), int(rss), p.stdout.decode()


def run(cmd, env=None):
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}): {p.stderr.decode()[-800:]}")
    return p.stdout.decode()


def du(path):
    return int(subprocess.run(["du", "-sb", path], check=True, stdout=subprocess.PIPE).stdout.split()[0])


def main():
    for p in (CAIRN, SYNTH, f"{BENCHDATA}/fs-v1", f"{BENCHDATA}/fs-v2"):
        if not os.path.exists(p):
            sys.exit(f"gc bench: {p} not found (see the docstring)")
    work = tempfile.mkdtemp(prefix=".cairn-gc-bench.", dir=TMP)
    rows = []
    try:
        # Two versions of one sandbox root, pushed in place; forget the older; collect.
        w = f"{work}/root"
        subprocess.run(["rsync", "-aHAX", "--delete", f"{BENCHDATA}/fs-v1/", f"{w}/"], check=True)
        env = dict(os.environ, CAIRN_REPO=f"{work}/cairn", CAIRN_CACHE_DIR=f"{work}/cache")
        subprocess.run([CAIRN, "init"], env=env, check=True, stdout=subprocess.DEVNULL)
        have_restic = os.environ.get("SKIP_RESTIC") != "1" and shutil.which("restic")
        renv = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=f"{work}/restic")
        if have_restic:
            subprocess.run(["restic", "init"], env=renv, check=True, stdout=subprocess.DEVNULL)
        for version in ("fs-v1", "fs-v2"):
            subprocess.run(["rsync", "-aHAX", "--delete", f"{BENCHDATA}/{version}/", f"{w}/"], check=True)
            run([CAIRN, "push", w], env=env)
            if have_restic:
                subprocess.run(["restic", "backup", "-q", w], env=renv, check=True, stdout=subprocess.DEVNULL)
        before = du(f"{work}/cairn")
        # Three runs each, every one from a copy of the same repository; the median counts
        # (one run of half a second swings by a third on this machine).
        def fresh(name):
            subprocess.run(["rm", "-rf", f"{work}/{name}"], check=True)
            subprocess.run(["cp", "-a", f"{work}/{name}.base", f"{work}/{name}"], check=True)
            subprocess.run(["sync"])

        subprocess.run(["cp", "-a", f"{work}/cairn", f"{work}/cairn.base"], check=True)
        runs = []
        for _ in range(3):
            fresh("cairn")
            f_s, f_rss, _ = timed([CAIRN, "forget", "--keep-last", "1"], env)
            # restic prune repacks until at most 5% is unused; --repack-below 0.95 is the like.
            g_s, g_rss, _ = timed([CAIRN, "gc", "--repack-below", "0.95"], env)
            runs.append((f_s + g_s, f_s, g_s, max(f_rss, g_rss)))
        cairn_s, f_s, g_s, c_rss = sorted(runs)[1]
        after = du(f"{work}/cairn")
        check = subprocess.run([CAIRN, "check"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        note = (f"median of 3 ({', '.join(f'{r[0]:.2f}' for r in runs)} s); freed {(before - after) / 1e6:.1f} MB "
                f"of {before / 1e6:.1f} MB; check {'ok' if check.returncode == 0 else 'FAILED'}")
        if have_restic:
            rbefore = du(f"{work}/restic")
            subprocess.run(["cp", "-a", f"{work}/restic", f"{work}/restic.base"], check=True)
            rruns = []
            for _ in range(3):
                fresh("restic")
                r_s, r_rss, _ = timed(["restic", "forget", "-q", "--keep-last", "1", "--prune"], renv)
                rruns.append((r_s, r_rss))
            r_s, r_rss = sorted(rruns)[1]
            rafter = du(f"{work}/restic")
            rows.append(("forget + gc --repack-below 0.95, fs-v1 then fs-v2 in place, keep last 1", f"{cairn_s:.2f} s ({f_s:.2f} + {g_s:.2f}), {c_rss / 1024:.0f} MiB",
                         f"{r_s:.2f} s, {r_rss / 1024:.0f} MiB (restic forget --prune, median of 3 ({', '.join(f'{r[0]:.2f}' for r in rruns)} s); freed {(rbefore - rafter) / 1e6:.1f} MB)",
                         f"{r_s / cairn_s:.1f}x restic", note + "; target >= 3x"))
        else:
            rows.append(("forget + gc, fs-v1 then fs-v2 in place, keep last 1", f"{cairn_s:.2f} s", "restic not installed", "", note))

        # Synthetic repositories: GC time and peak memory per live chunk.
        cold_peaks = []
        for n in SIZES:
            repo = f"{work}/synth{n}"
            log(f"generating a {n}-chunk repository")
            subprocess.run([SYNTH, repo, str(n)], check=True, stdout=subprocess.DEVNULL)
            senv = dict(os.environ, CAIRN_REPO=repo, CAIRN_CACHE_DIR=f"{work}/scache{n}")
            cold_s, cold_rss, _ = timed([CAIRN, "gc"], senv)
            cold_peaks.append((n, cold_rss))
            warm_s, warm_rss, _ = timed([CAIRN, "gc"], senv)
            rows.append((f"gc, synthetic {n / 1e6:g}M live chunks (+10% dead)",
                         f"{cold_s:.1f} s, {cold_rss / 1024:.0f} MiB = {cold_rss * 1024 / n:.1f} B/chunk", "", "",
                         "deletes the dead pack, compacts the index; target < 32 B/chunk"))
            rows.append((f"gc, synthetic {n / 1e6:g}M, second run (nothing to free)",
                         f"{warm_s:.1f} s, {warm_rss / 1024:.0f} MiB = {warm_rss * 1024 / n:.1f} B/chunk", "", "", ""))
            shutil.rmtree(repo, ignore_errors=True)
            shutil.rmtree(f"{repo}.cache", ignore_errors=True)
            shutil.rmtree(f"{work}/scache{n}", ignore_errors=True)
        if len(cold_peaks) >= 2:
            (n0, r0), (n1, r1) = cold_peaks[0], cold_peaks[-1]
            rows.append((f"gc peak memory per additional live chunk, {n0 / 1e6:g}M to {n1 / 1e6:g}M",
                         f"{(r1 - r0) * 1024 / (n1 - n0):.1f} B/chunk", "", "",
                         "what each chunk costs above the fixed costs (the process and its code pages, one index segment or metadata batch)"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(write_section(OUT, "gc", "## GC (bench/gc.py, one run)",
                        "Wall clock and peak RSS (GNU time) of one run on this machine (2 cores).", rows))


if __name__ == "__main__":
    main()
