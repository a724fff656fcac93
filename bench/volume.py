#!/usr/bin/env python3
"""Volume benchmark: commit cost of a small change in a 1 GiB volume, write throughput into a
writable mount against a local directory, and `pip install` of a local wheel into a venv in
a writable mount against a local directory.

Writes (or replaces) the "Volumes" section of docs/benchmarks.md between
<!-- volume:begin --> and <!-- volume:end -->. Needs root (overlayfs and FUSE mounts), a
release build of cairn, python3 with venv, zstd, and the dataset fs-v1 in $BENCHDATA.

Environment: CAIRN, BENCHDATA, OUT, BENCH_TMP.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from section import write_section  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAIRN = os.path.abspath(os.environ.get("CAIRN", f"{ROOT}/target/release/cairn"))
BENCHDATA = os.path.abspath(os.environ.get("BENCHDATA", f"{ROOT}/benchdata"))
OUT = os.path.abspath(os.environ.get("OUT", f"{ROOT}/docs/benchmarks.md"))
TMP = os.path.abspath(os.environ.get("BENCH_TMP", BENCHDATA))
MiB = 1 << 20


def log(msg):
    print(f"[volume-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, env=None, cwd=None):
    p = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}): {p.stderr.decode()[-800:]}")
    return p.stdout.decode()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def is_mounted(path):
    path = os.path.realpath(path)
    return any(line.split()[4] == path for line in open("/proc/self/mountinfo"))


class RwMount:
    def __init__(self, env, volume, mnt, state):
        os.makedirs(mnt, exist_ok=True)
        self.mnt = mnt
        self.p = subprocess.Popen([CAIRN, "mount", "--rw", volume, mnt, "--state-dir", state], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while not is_mounted(mnt):
            if self.p.poll() is not None:
                raise RuntimeError(f"mount --rw failed: {self.p.stderr.read().decode()}")
            if time.time() > deadline:
                raise RuntimeError("mount --rw did not appear")
            time.sleep(0.01)

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=120)


def drop_caches():
    subprocess.run(["sync"])
    try:
        open("/proc/sys/vm/drop_caches", "w").write("3")
    except OSError:
        pass


def make_wheel(path):
    files = {"benchpkg/__init__.py": "VALUE = 1\n" + "# padding\n" * 2000}
    for i in range(200):
        files[f"benchpkg/mod{i}.py"] = f"def f{i}(x):\n    return x + {i}\n" * 50
    files["benchpkg-1.0.dist-info/METADATA"] = "Metadata-Version: 2.1\nName: benchpkg\nVersion: 1.0\n"
    files["benchpkg-1.0.dist-info/WHEEL"] = "Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    import base64
    import hashlib
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            data = text.encode()
            z.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        record.append("benchpkg-1.0.dist-info/RECORD,,")
        z.writestr("benchpkg-1.0.dist-info/RECORD", "\n".join(record) + "\n")


def pip_install(where, wheel):
    run(["python3", "-m", "venv", f"{where}/venv"])
    run([f"{where}/venv/bin/pip", "install", "-q", "--no-index", "--no-cache-dir",
         "--disable-pip-version-check", wheel])
    subprocess.run(["sync", "-f", where])


def main():
    if os.geteuid() != 0:
        sys.exit("volume bench: needs root (overlayfs and FUSE mounts)")
    for p in (CAIRN, f"{BENCHDATA}/fs-v1"):
        if not os.path.exists(p):
            sys.exit(f"volume bench: {p} not found (see the docstring)")
    work = tempfile.mkdtemp(prefix=".cairn-volume-bench.", dir=TMP)
    rows = []
    mounts = []
    try:
        env = dict(os.environ, CAIRN_REPO=f"{work}/repo", CAIRN_CACHE_DIR=f"{work}/cache")
        run([CAIRN, "init"], env)
        # 1 GiB volume: 64 files of 16 MiB, incompressible.
        src = f"{work}/src"
        for d in range(8):
            os.makedirs(f"{src}/d{d}")
            for i in range(8):
                with open(f"{src}/d{d}/f{i}", "wb") as f:
                    f.write(os.urandom(16 * MiB))
        run([CAIRN, "volume", "create", "big"], env)
        push_s, _ = timed(lambda: run([CAIRN, "push", "--volume", "big", src], env))
        log(f"pushed the 1 GiB volume in {push_s:.1f} s")
        mnt, state = f"{work}/mnt", f"{work}/state"
        m = RwMount(env, "big", mnt, state)
        mounts.append(m)

        def commit(label, changed_path):
            drop_caches()
            secs, out = timed(lambda: run([CAIRN, "volume", "commit", mnt, "--json"], env))
            c = json.loads(out)
            s, r = c["summary"]["stats"], c["summary"]["requests"]
            compressed = int(subprocess.run(f"zstd -3 -c '{changed_path}' | wc -c", shell=True, check=True,
                                            stdout=subprocess.PIPE).stdout)
            up = r["bytes_up"]
            rows.append((label, f"{secs * 1000:.0f} ms",
                         f"{s['bytes_read'] / MiB:.1f} MiB read, {up / MiB:.2f} MiB up, {r['bytes_down'] / MiB:.2f} MiB down, {r['gets'] + r['puts'] + r['lists'] + r['heads'] + r['deletes']} requests",
                         f"{up / compressed:.2f}x the file's zstd size ({compressed / MiB:.1f} MiB)",
                         "target < 200 ms and < 2x"))

        # A 1 MiB overwrite in the middle of one 16 MiB file.
        f = f"{mnt}/d3/f5"
        with open(f, "r+b") as fh:
            fh.seek(8 * MiB)
            fh.write(os.urandom(MiB))
        commit("commit after a 1 MiB write into one 16 MiB file of a 1 GiB volume", f)
        # One file rewritten whole.
        f = f"{mnt}/d6/f1"
        with open(f, "wb") as fh:
            fh.write(os.urandom(16 * MiB))
        commit("commit after rewriting one 16 MiB file of a 1 GiB volume", f)

        # Write throughput: one 1 GiB file, and a tree of small files (fs-v1), into the mount
        # and into a local directory on the same disk as the upper layer.
        local = f"{work}/local"
        os.makedirs(local)
        blob = "/dev/shm/cairn-bench-blob"
        with open(blob, "wb") as fh:
            for _ in range(16):
                fh.write(os.urandom(64 * MiB))
        try:
            def big_write(where):
                drop_caches()
                return timed(lambda: run(["dd", f"if={blob}", f"of={where}/blob", "bs=4M", "conv=fsync", "status=none"]))[0]
            t_local, t_mnt = big_write(local), big_write(mnt)
            rows.append(("write 1 GiB sequentially (dd conv=fsync)", f"{1024 / t_mnt:.0f} MiB/s",
                         f"{1024 / t_local:.0f} MiB/s local directory", f"{t_local / t_mnt:.2f}x local", "target >= 0.5x"))
        finally:
            os.unlink(blob)

        def tree_write(where):
            drop_caches()
            return timed(lambda: run(["cp", "-a", f"{BENCHDATA}/fs-v1", f"{where}/tree"]))[0]
        size = int(run(["du", "-sb", f"{BENCHDATA}/fs-v1"]).split()[0])
        t_local, t_mnt = tree_write(local), tree_write(mnt)
        rows.append(("cp -a of fs-v1 (6746 files) into the volume", f"{size / MiB / t_mnt:.0f} MiB/s ({t_mnt:.2f} s)",
                     f"{size / MiB / t_local:.0f} MiB/s ({t_local:.2f} s) local directory", f"{t_local / t_mnt:.2f}x local", "target >= 0.5x"))
        secs, out = timed(lambda: run([CAIRN, "volume", "commit", mnt, "--json"], env))
        c = json.loads(out)["summary"]
        rows.append(("commit after that cp -a (1 GiB written, 257 MB tree)", f"{secs:.2f} s",
                     f"{c['stats']['bytes_read'] / MiB:.0f} MiB read, {c['requests']['bytes_up'] / MiB:.0f} MiB up", "", ""))

        wheel = f"{work}/benchpkg-1.0-py3-none-any.whl"
        make_wheel(wheel)
        os.makedirs(f"{mnt}/py")
        os.makedirs(f"{local}/py")
        drop_caches()
        t_local, _ = timed(lambda: pip_install(f"{local}/py", wheel))
        drop_caches()
        t_mnt, _ = timed(lambda: pip_install(f"{mnt}/py", wheel))
        rows.append(("python3 -m venv + pip install of a local wheel (201 modules)", f"{t_mnt:.2f} s",
                     f"{t_local:.2f} s local directory", f"{t_local / t_mnt:.2f}x local", ""))
        m.stop()
        mounts.clear()
    finally:
        for m in mounts:
            try:
                m.stop()
            except Exception:
                pass
        shutil.rmtree(work, ignore_errors=True)

    print(write_section(OUT, "volume", "## Volumes (bench/volume.py, one run)",
                        "Writable mount = overlayfs over the lazy mount; upper layer on the same disk as the local "
                        "directory. Page cache dropped before each commit and write. Commit times are the whole "
                        "`cairn volume commit` command (client process, request to the mount daemon, commit, head update).",
                        rows))


if __name__ == "__main__":
    main()
