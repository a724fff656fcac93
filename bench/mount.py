#!/usr/bin/env python3
"""Mount benchmark: cairn's lazy FUSE mount against local disk, `restic mount` and moto, in one run.

Writes (or replaces) the "Mount" section of docs/benchmarks.md, between the markers
<!-- mount:begin --> and <!-- mount:end -->. Needs root (FUSE, chroot), fusermount3, the
datasets fs-v1 (and fs-v2) in $BENCHDATA, and a release build of cairn. restic and moto_server
are used when installed.

Environment: CAIRN, BENCHDATA, OUT, BENCH_TMP (as bench/run.sh), SKIP_RESTIC=1, SKIP_MOTO=1.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from section import write_section  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAIRN = os.path.abspath(os.environ.get("CAIRN", f"{ROOT}/target/release/cairn"))
BENCHDATA = os.path.abspath(os.environ.get("BENCHDATA", f"{ROOT}/benchdata"))
OUT = os.path.abspath(os.environ.get("OUT", f"{ROOT}/docs/benchmarks.md"))
TMP = os.path.abspath(os.environ.get("BENCH_TMP", BENCHDATA))
FS = f"{BENCHDATA}/fs-v1"
FS2 = f"{BENCHDATA}/fs-v2"


def log(msg):
    print(f"[mount-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, env=None, **kw):
    return subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


def drop_page_cache():
    """Cold means cold: the kernel forgets file pages (the packs of a local repo included)."""
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class Mount:
    def __init__(self, env, snap, mnt, *extra):
        os.makedirs(mnt, exist_ok=True)
        self.mnt = mnt
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([CAIRN, "mount", snap, mnt, *extra], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Ready = the first `ls` of the mountpoint is answered by cairn.
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cairn mount exited: {self.proc.stderr.read().decode()}")
            if mounted(mnt) and os.listdir(mnt):
                break
            time.sleep(0.0005)
        self.ready_s = time.perf_counter() - self.started

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def read_all(path):
    """Every regular file's bytes, in tree order, through tar into cat: one reader, like a restore."""
    t = time.perf_counter()
    subprocess.run(f"tar -C '{path}' -cf - . | cat > /dev/null", shell=True, check=True,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def du_bytes(path):
    out = run(["du", "-sb", "--apparent-size", path]).stdout.decode()
    return int(out.split()[0])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    if os.geteuid() != 0:
        sys.exit("mount bench: needs root (FUSE mounts with --dev, chroot, drop_caches)")
    for p in (CAIRN, FS):
        if not os.path.exists(p):
            sys.exit(f"mount bench: {p} not found (build cairn --release; set BENCHDATA)")
    work = tempfile.mkdtemp(prefix=".cairn-mount-bench.", dir=TMP)
    rows = []   # (measure, cairn, other, ratio text, note)
    extra = {}
    try:
        env = dict(os.environ, CAIRN_REPO=f"{work}/repo", CAIRN_CACHE_DIR=f"{work}/cache")
        run([CAIRN, "init"], env=env)
        snap1 = run([CAIRN, "push", FS], env=env).stdout.decode().split()[-1]
        snap2 = run([CAIRN, "push", FS2], env=env).stdout.decode().split()[-1] if os.path.exists(FS2) else None
        tiny_src = f"{work}/tiny"
        os.makedirs(tiny_src)
        open(f"{tiny_src}/hello", "w").write("hi\n")
        tiny = run([CAIRN, "push", tiny_src], env=env).stdout.decode().split()[-1]
        size = du_bytes(FS)
        files = int(run(["find", FS, "-type", "f"]).stdout.decode().count("\n"))
        extra["dataset"] = f"fs-v1: {files} files, {size / 1e6:.1f} MB"

        # 1. Mount ready, by snapshot size.
        ready = {}
        for name, snap in [("tiny (1 file)", tiny), ("fs-v1", snap1)] + ([("fs-v2", snap2)] if snap2 else []):
            times = []
            for _ in range(5):
                m = Mount(env, snap, f"{work}/mnt", "--no-prefetch")
                times.append(m.ready_s)
                m.stop()
            ready[name] = sorted(times)[len(times) // 2]
        for name, t in ready.items():
            rows.append((f"mount ready (first ls answered), {name}, median of 5", f"{t * 1000:.1f} ms", "", "", "target < 50 ms"))

        # 2. Local disk (page cache warm) vs warm mount (host chunk cache full, fresh mount).
        read_all(FS)
        local_s = read_all(FS)
        m = Mount(env, snap1, f"{work}/mnt", "--no-prefetch")
        first_s = read_all(f"{work}/mnt")
        m.stop()
        m = Mount(env, snap1, f"{work}/mnt", "--no-prefetch")
        warm_s = read_all(f"{work}/mnt")
        m.stop()
        rows.append(("read every file, local disk (page cache)", "", f"{local_s:.2f} s", "", f"{size / local_s / 1e6:.0f} MB/s"))
        rows.append(("read every file, warm mount (host cache full)", f"{warm_s:.2f} s", "", f"{local_s / warm_s:.2f}x of local", "target >= 0.70x"))

        # 3. Cold mount of a local repository (empty chunk cache, kernel caches dropped).
        run([CAIRN, "cache", "clear"], env=env)
        dropped = drop_page_cache()
        m = Mount(env, snap1, f"{work}/mnt", "--no-prefetch")
        ttfb_t = time.perf_counter()
        with open(f"{work}/mnt/etc/debian_version", "rb") as f:
            f.read(1)
        ttfb = time.perf_counter() - ttfb_t
        m.stop()
        run([CAIRN, "cache", "clear"], env=env)
        drop_page_cache()
        m = Mount(env, snap1, f"{work}/mnt", "--no-prefetch")
        cold_s = read_all(f"{work}/mnt")
        m.stop()
        rows.append(("time to first byte of a small file, cold mount", f"{ttfb * 1000:.1f} ms", "", "", "local repo, page cache dropped" if dropped else "local repo"))

        restic_s = None
        if os.environ.get("SKIP_RESTIC") != "1" and shutil.which("restic"):
            renv = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=f"{work}/restic")
            run(["restic", "init"], env=renv)
            run(["restic", "backup", "-q", FS], env=renv)
            os.makedirs(f"{work}/rmnt", exist_ok=True)
            drop_page_cache()
            rp = subprocess.Popen(["restic", "mount", f"{work}/rmnt"], env=renv,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            target = f"{work}/rmnt/snapshots/latest{FS}"
            deadline = time.time() + 60
            while not (mounted(f"{work}/rmnt") and os.path.exists(target)):
                if time.time() > deadline:
                    raise RuntimeError("restic mount did not come up")
                time.sleep(0.05)
            restic_s = read_all(target)
            rp.terminate()
            rp.wait(timeout=60)
            subprocess.run(["fusermount3", "-u", "-z", f"{work}/rmnt"], stderr=subprocess.DEVNULL)
        rows.append(("read every file, cold mount, local repo", f"{cold_s:.2f} s",
                     f"{restic_s:.2f} s" if restic_s else "not installed",
                     f"{restic_s / cold_s:.2f}x restic" if restic_s else "", "target >= 3x restic mount"))

        # 4. Cold mount through moto on 127.0.0.1.
        if os.environ.get("SKIP_MOTO") != "1" and shutil.which("moto_server"):
            port = free_port()
            moto = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                        break
                    except OSError:
                        time.sleep(0.1)
                subprocess.run(["curl", "-s", "-X", "PUT", f"http://127.0.0.1:{port}/bench"], check=True,
                               stdout=subprocess.DEVNULL)
                senv = dict(os.environ, CAIRN_REPO="s3://bench/repo", CAIRN_CACHE_DIR=f"{work}/scache",
                            AWS_ENDPOINT=f"http://127.0.0.1:{port}", AWS_ALLOW_HTTP="true",
                            AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_REGION="us-east-1")
                run([CAIRN, "init"], env=senv)
                s3snap = run([CAIRN, "push", FS], env=senv).stdout.decode().split()[-1]
                m = Mount(senv, s3snap, f"{work}/mnt", "--no-prefetch")
                s3_ready = m.ready_s
                s3_s = read_all(f"{work}/mnt")
                m.stop()
                rows.append(("mount ready, moto on 127.0.0.1", f"{s3_ready * 1000:.1f} ms", "", "", ""))
                rows.append(("read every file, cold mount, moto on 127.0.0.1", f"{s3_s:.2f} s", "", "",
                             f"{size / s3_s / 1e6:.0f} MB/s"))
            finally:
                moto.terminate()

        # 5. python3 in a chroot of the mount: cold and warm.
        def py_in_chroot():
            m = Mount(env, snap1, f"{work}/mnt", "--no-prefetch", "--dev")
            t = time.perf_counter()
            run(["chroot", f"{work}/mnt", "/usr/bin/python3", "-c", "import json, sqlite3"])
            took = time.perf_counter() - t
            m.stop()
            return took

        run([CAIRN, "cache", "clear"], env=env)
        drop_page_cache()
        py_cold = py_in_chroot()
        py_warm = py_in_chroot()
        t = time.perf_counter()
        run(["chroot", FS, "/usr/bin/python3", "-c", "import json, sqlite3"])
        py_local = time.perf_counter() - t
        rows.append(("`python3 -c 'import json, sqlite3'` in a chroot, cold mount", f"{py_cold * 1000:.0f} ms", f"{py_local * 1000:.0f} ms local", "", ""))
        rows.append(("same, warm mount", f"{py_warm * 1000:.0f} ms", f"{py_local * 1000:.0f} ms local", "", ""))
    finally:
        for p in (f"{work}/mnt", f"{work}/rmnt"):
            if os.path.exists(p) and mounted(p):
                subprocess.run(["fusermount3", "-u", "-z", p], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)

    print(write_section(OUT, "mount", "## Mount (bench/mount.py, one run)",
                        f"{extra['dataset']}; times are wall clock of one run on this machine (2 cores). "
                        "Cold: empty host chunk cache and the kernel's page cache dropped; warm: host chunk cache full, "
                        "a fresh mount (the kernel's cache of the mount is empty). Readers: `tar -cf - . | cat`.", rows))


if __name__ == "__main__":
    main()
