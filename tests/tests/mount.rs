//! Real FUSE mounts of real snapshots, read by real programs.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_tests::*;

const EIO: i32 = nix::errno::Errno::EIO as i32;

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    let mut reader = h.finalize_xof();
    out.resize(len, 0);
    reader.fill(&mut out);
    out
}

#[test]
fn debian_rootfs_mount_matches_source_and_runs_programs() {
    let rootfs = debian_rootfs();
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let snap = repo.push(&rootfs, &[]);
    let mnt = tmp.path().join("mnt");
    // --dev: programs in the chroot open the snapshot's own /dev/null.
    let m = repo.mount(&snap, &mnt, &["--dev", "--suid"]);

    // Byte for byte, and every piece of metadata, entry by entry.
    sh(Command::new("diff").args(["-r", "--no-dereference"]).arg(&rootfs).arg(&mnt));
    assert_same_tree_with(&rootfs, &mnt, false);

    // Programs run from the mount (exec and mmap of binaries and libraries).
    let out = sh(Command::new("chroot").arg(&mnt).args([
        "/bin/sh",
        "-c",
        "echo ran on debian $(cat /etc/debian_version); ls /usr/bin | wc -l",
    ]));
    assert!(out.starts_with("ran on debian 12"), "{out}");
    let out = sh(Command::new("chroot").arg(&mnt).args([
        "/usr/bin/python3",
        "-c",
        "import json, sqlite3, email.parser, http.client, decimal; print(json.dumps([sqlite3.sqlite_version, str(decimal.Decimal(1)/7)]))",
    ]));
    assert!(out.contains("0.1428571428571428571428571429"), "{out}");
    let out = sh(Command::new("chroot").arg(&mnt).args(["/usr/bin/git", "--version"]));
    assert!(out.starts_with("git version"), "{out}");

    let stats = m.stats();
    assert_eq!(stats["read_errors"], 0, "{stats}");
    let (status, err) = m.stop();
    assert!(status.success(), "daemon exit {status}: {err}");
    assert!(!is_mounted(&mnt), "still mounted after SIGTERM");
}

/// A git repository, a SQLite database, an mmap'ed file and a memory image, through mounts of a
/// local repository and of a bucket on moto.
#[test]
fn git_sqlite_mmap_and_memory_images_through_local_and_s3_mounts() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("repo")).unwrap();
    let git = |args: &[&str]| {
        sh(Command::new("git")
            .arg("-C")
            .arg(src.join("repo"))
            .args(["-c", "user.name=t", "-c", "user.email=t@e", "-c", "init.defaultBranch=main"])
            .args(args))
    };
    git(&["init", "-q"]);
    for i in 0..20 {
        std::fs::write(src.join("repo").join(format!("f{i}.txt")), format!("file {i}\n").repeat(i * 100 + 1))
            .unwrap();
        git(&["add", "."]);
        git(&["commit", "-q", "-m", &format!("commit {i}")]);
    }
    git(&["gc", "-q"]);
    sh(Command::new("python3").arg("-c").arg(format!(
        "import sqlite3; c = sqlite3.connect('{}'); c.execute('create table t (k integer primary key, v text)'); \
         c.executemany('insert into t (v) values (?)', [('row %d' % i * 20,) for i in range(20000)]); c.commit()",
        src.join("db.sqlite").display()
    )));
    std::fs::write(src.join("blob.bin"), random_bytes(3 << 20, 7)).unwrap();
    // A memory image: data, zero pages, data.
    let mem = tmp.path().join("guest.mem");
    let mut image = random_bytes(1 << 20, 9);
    image.extend(vec![0u8; 2 << 20]);
    image.extend(random_bytes(1 << 20, 10));
    std::fs::write(&mem, &image).unwrap();

    let moto = Moto::start();
    for (name, repo) in
        [("local", Repo::local(&tmp.path().join("repo"))), ("s3", Repo::s3(&moto, "mount-test"))]
    {
        repo.ok(&["init"]);
        let snap = repo.push(&src, &[]);
        let mnt = tmp.path().join(format!("mnt-{name}"));
        let m = repo.mount(&snap, &mnt, &[]);
        let fsck = Command::new("git")
            .arg("-C")
            .arg(mnt.join("repo"))
            .args(["fsck", "--full", "--strict"])
            .output()
            .unwrap();
        assert!(fsck.status.success(), "{name}: git fsck: {}", String::from_utf8_lossy(&fsck.stderr));
        let log = sh(Command::new("git").arg("-C").arg(mnt.join("repo")).args(["log", "--oneline"]));
        assert_eq!(log.lines().count(), 20, "{name}");
        let rows = sh(Command::new("python3").arg("-c").arg(format!(
            "import sqlite3; c = sqlite3.connect('file:{}?immutable=1', uri=True); print(c.execute('select count(*), sum(length(v)) from t').fetchone())",
            mnt.join("db.sqlite").display()
        )));
        let expected = sh(Command::new("python3").arg("-c").arg(format!(
            "import sqlite3; c = sqlite3.connect('{}'); print(c.execute('select count(*), sum(length(v)) from t').fetchone())",
            src.join("db.sqlite").display()
        )));
        assert_eq!(rows, expected, "{name}");
        let mmapped = sh(Command::new("python3").arg("-c").arg(format!(
            "import mmap, hashlib; f = open('{}', 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); print(hashlib.sha256(m[:]).hexdigest())",
            mnt.join("blob.bin").display()
        )));
        let direct = sh(Command::new("sha256sum").arg(src.join("blob.bin")));
        assert_eq!(mmapped.trim(), direct.split(' ').next().unwrap(), "{name}: mmap read differs");
        let (status, err) = m.stop();
        assert!(status.success(), "{name}: {err}");

        let msnap = repo.push(&mem, &["--kind", "memory"]);
        let mmnt = tmp.path().join(format!("mem-{name}"));
        let m = repo.mount(&msnap, &mmnt, &[]);
        assert_eq!(std::fs::read(mmnt.join("guest.mem")).unwrap(), image, "{name}: memory image differs");
        // Zero pages are holes: never fetched. (Stats are refreshed every second.)
        std::thread::sleep(Duration::from_millis(1200));
        let stats = m.stats();
        let fetched = stats["fetched_bytes"].as_u64().unwrap();
        assert!(fetched < (2 << 20) + (256 << 10), "{name}: zero pages were fetched: {stats}");
        let (status, err) = m.stop();
        assert!(status.success(), "{name}: {err}");
    }
}

#[test]
fn corrupt_chunk_is_eio_for_its_file_only_and_is_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let bad = random_bytes(200_000, 1);
    let good = random_bytes(200_000, 2);
    std::fs::write(src.join("bad.bin"), &bad).unwrap();
    let repo_dir = tmp.path().join("repo");
    let repo = Repo::local(&repo_dir);
    repo.ok(&["init"]);
    let first = repo.push(&src, &[]);
    // The good file goes in a later push, so it lives in another pack.
    std::fs::write(src.join("good.bin"), &good).unwrap();
    let snap = repo.push(&src, &[]);
    assert_ne!(first, snap);
    // Damage the pack holding bad.bin (the only data pack of the first push): flip bytes in
    // the middle of its chunk data.
    let packs: Vec<_> = files_under(&repo_dir.join("packs"));
    let first_pack = packs
        .iter()
        .find(|p| {
            let bytes = std::fs::read(p).unwrap();
            bytes.windows(64).any(|w| w == &bad[1000..1064])
        })
        .expect("bad.bin is stored raw (incompressible) in one pack")
        .clone();
    let mut bytes = std::fs::read(&first_pack).unwrap();
    let at = bytes.windows(64).position(|w| w == &bad[1000..1064]).unwrap();
    bytes[at + 10] ^= 0xff;
    std::fs::write(&first_pack, bytes).unwrap();

    let mnt = tmp.path().join("mnt");
    let m = repo.mount(&snap, &mnt, &["--no-prefetch"]);
    let err = std::fs::read(mnt.join("bad.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    assert_eq!(std::fs::read(mnt.join("good.bin")).unwrap(), good);
    // Not cached: asking again fails again rather than serving bytes.
    let again = std::fs::read(mnt.join("bad.bin")).unwrap_err();
    assert_eq!(again.raw_os_error(), Some(EIO));
    std::thread::sleep(Duration::from_millis(1200));
    let stats = m.stats();
    assert!(stats["bad_chunks"].as_u64().unwrap() >= 1, "{stats}");
    let (status, err) = m.stop();
    assert!(status.success(), "{err}");
    assert!(err.contains("BLAKE3"), "the bad chunk is logged: {err}");
}

/// A mount lives for days; a gc meanwhile may move the chunks it serves into new packs and
/// delete the old ones. The mount finds the old pack gone, refreshes its chunk index and
/// reads the chunks where they are now.
#[test]
fn a_mount_reads_chunks_that_gc_moved_while_it_ran() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let x = random_bytes(300_000, 5);
    std::fs::write(src.join("x.bin"), &x).unwrap();
    std::fs::write(src.join("y.bin"), random_bytes(300_000, 6)).unwrap();
    let repo_dir = tmp.path().join("repo");
    let repo = Repo::local(&repo_dir);
    repo.ok(&["init"]);
    let first = repo.push(&src, &[]);
    std::fs::remove_file(src.join("y.bin")).unwrap();
    let snap = repo.push(&src, &[]);

    let mnt = tmp.path().join("mnt");
    let m = repo.mount(&snap, &mnt, &["--no-prefetch"]);
    // The first snapshot goes: x's pack is half dead, so gc copies x out and deletes it.
    let listed = repo.json(&["snapshots"]);
    let mut ids = listed.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string());
    let id = ids.rfind(|id| id.starts_with(&first)).expect("the first snapshot is listed");
    std::fs::remove_file(repo_dir.join("snapshots").join(&id)).unwrap();
    let report = repo.json(&["gc", "--repack-below", "0.9"]);
    assert!(report["packs_repacked"].as_u64().unwrap() >= 1, "{report}");
    assert!(report["packs_deleted"].as_u64().unwrap() >= 1, "{report}");

    assert_eq!(std::fs::read(mnt.join("x.bin")).unwrap(), x);
    let (status, err) = m.stop();
    assert!(status.success(), "{err}");
    repo.ok(&["check", "--read-data"]);
}

#[test]
fn unreachable_bucket_is_eio_and_the_mount_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let a = random_bytes(300_000, 3);
    let b = random_bytes(300_000, 4);
    std::fs::write(src.join("a.bin"), &a).unwrap();
    std::fs::create_dir(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/b.bin"), &b).unwrap();
    let moto = Moto::start();
    let direct = Repo::s3(&moto, "flaky");
    direct.ok(&["init"]);
    let snap = direct.push(&src, &[]);

    let relay = Relay::start(moto.port);
    let mut repo =
        Repo { url: direct.url.clone(), cache: tempfile::tempdir().unwrap(), env: direct.env.clone() };
    for (k, v) in repo.env.iter_mut() {
        if k == "AWS_ENDPOINT" {
            *v = format!("http://127.0.0.1:{}", relay.port);
        }
    }
    repo.env.extend([
        ("CAIRN_S3_TIMEOUT".to_string(), "2s".to_string()),
        ("CAIRN_S3_RETRY_TIMEOUT".to_string(), "4s".to_string()),
        ("CAIRN_S3_MAX_RETRIES".to_string(), "2".to_string()),
    ]);
    let mnt = tmp.path().join("mnt");
    let m = repo.mount(&snap, &mnt, &["--no-prefetch"]);
    relay.set_up(false);
    let started = Instant::now();
    let err = std::fs::read(mnt.join("a.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "retries are bounded");
    assert!(is_mounted(&mnt), "the mount stays up");
    relay.set_up(true);
    assert_eq!(std::fs::read(mnt.join("a.bin")).unwrap(), a, "recovers when the bucket returns");
    assert_eq!(std::fs::read(mnt.join("sub/b.bin")).unwrap(), b);
    let (status, err) = m.stop();
    assert!(status.success(), "{err}");
}

#[test]
fn sigterm_unmounts_and_stale_mounts_can_be_unmounted() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_rich_tree(&src);
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let snap = repo.push(&src, &[]);
    let mnt = tmp.path().join("mnt");

    let m = repo.mount(&snap, &mnt, &[]);
    assert_same_tree_with(&src, &mnt, false);
    let (status, err) = m.stop();
    assert!(status.success(), "{err}");
    assert!(!is_mounted(&mnt));

    // Stopped the moment it appears (a supervisor's health check then a stop): SIGTERM is
    // handled from before the mount exists, so it always unmounts cleanly.
    for _ in 0..10 {
        let (status, err) = repo.mount(&snap, &mnt, &[]).stop();
        assert!(status.success(), "stopped right after mounting: {status} {err}");
        assert!(!is_mounted(&mnt));
    }

    // A daemon killed outright leaves a dead mount; `cairn umount` still removes it.
    let mut m = repo.mount(&snap, &mnt, &[]);
    m.child.kill().unwrap();
    m.child.wait().unwrap();
    assert!(is_mounted(&mnt));
    let err = std::fs::read_dir(&mnt).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::ENOTCONN as i32), "{err}");
    repo.ok(&["umount", mnt.to_str().unwrap()]);
    assert!(!is_mounted(&mnt));
    drop(m);
}

#[test]
fn trace_is_recorded_stored_and_prefetched_by_the_next_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..30 {
        std::fs::write(src.join(format!("f{i:02}")), random_bytes(100_000, 100 + i)).unwrap();
    }
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let snap = repo.push(&src, &[]);
    let mnt = tmp.path().join("mnt");
    let trace_file = tmp.path().join("trace");
    // Mount 1 reads a third of the files and stores what it touched.
    let m = repo.mount(
        &snap,
        &mnt,
        &["--store-trace", "--record-trace", trace_file.to_str().unwrap(), "--no-prefetch"],
    );
    for i in (0..30).step_by(3) {
        std::fs::read(mnt.join(format!("f{i:02}"))).unwrap();
    }
    let (status, err) = m.stop();
    assert!(status.success(), "{err}");
    assert!(trace_file.metadata().unwrap().len() > 0);
    let traces = files_under(&tmp.path().join("repo/traces"));
    assert_eq!(traces.len(), 1);

    // Mount 2 on an empty cache prefetches the trace before anyone reads.
    repo.ok(&["cache", "clear"]);
    let m = repo.mount(&snap, &mnt, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = m.stats();
        if s["prefetched_bytes"].as_u64().unwrap() >= 10 * 100_000 {
            break;
        }
        assert!(Instant::now() < deadline, "trace not prefetched: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = m.stats();
    for i in (0..30).step_by(3) {
        assert_eq!(
            std::fs::read(mnt.join(format!("f{i:02}"))).unwrap(),
            random_bytes(100_000, 100 + i as u64)
        );
    }
    std::thread::sleep(Duration::from_millis(1200));
    let after = m.stats();
    assert_eq!(after["misses"], before["misses"], "traced files were fetched again: {after}");
    assert_eq!(after["range_reads"], before["range_reads"], "{after}");
    let (status, err) = m.stop();
    assert!(status.success(), "{err}");
}

/// The counters once the daemon has written them after `since` (refreshed every second).
fn stats_after(m: &MountProc, since: Instant) -> serde_json::Value {
    std::thread::sleep((since + Duration::from_millis(1300)).saturating_duration_since(Instant::now()));
    m.stats()
}

/// On a warm mount, reading one file of a listed directory pushes the directory's other small
/// files into the page cache: reading them afterwards reaches the daemon not once, and gives
/// the right bytes. A listing alone (`find`, `ls`), large files, a cold cache (priming never
/// fetches) and `--prime-max-file 0` are left to ordinary reads.
#[test]
fn listed_small_files_are_primed_into_the_page_cache_when_local() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let small = |i: u64| random_bytes(40_000 + 1000 * i as usize, 300 + i);
    for i in 0..20 {
        std::fs::write(src.join(format!("s{i:02}")), small(i)).unwrap();
    }
    std::fs::write(src.join("big"), random_bytes(3 << 20, 399)).unwrap();
    std::fs::write(src.join("sub/inner"), small(50)).unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let snap = repo.push(&src, &[]);
    let mnt = tmp.path().join("mnt");
    let read = |i: u64| assert_eq!(std::fs::read(mnt.join(format!("s{i:02}"))).unwrap(), small(i), "s{i:02}");

    // Cold: nothing is local, and priming does not fetch.
    let m = repo.mount(&snap, &mnt, &["--no-prefetch"]);
    let mounted = m.stats(); // the root directory was fetched to mount
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 22);
    read(0);
    let s = stats_after(&m, Instant::now());
    assert_eq!(s["primed_files"], 0, "{s}");
    // Fill the host cache.
    (1..20).for_each(&read);
    assert_eq!(std::fs::read(mnt.join("big")).unwrap().len(), 3 << 20);
    let (status, err) = m.stop();
    assert!(status.success(), "{err}");
    assert!(mounted["misses"].as_u64().unwrap() < s["misses"].as_u64().unwrap());

    // Warm, fresh mount: a listing alone primes nothing...
    let m = repo.mount(&snap, &mnt, &["--no-prefetch"]);
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 22);
    let s = stats_after(&m, Instant::now());
    assert_eq!(s["primed_files"], 0, "a listing alone primed files: {s}");
    // ...the first read primes the directory's other small files.
    read(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = serde_json::Value::Null;
    let before = loop {
        std::thread::sleep(Duration::from_millis(1100));
        let s = m.stats();
        if s["primed_files"].as_u64().unwrap() >= 10 && s["primed_files"] == last["primed_files"] {
            break s;
        }
        assert!(Instant::now() < deadline, "small files not primed: {s}");
        last = s;
    };
    let primed = before["primed_files"].as_u64().unwrap();
    assert!(primed <= 19, "{before}");
    // Every unprimed file (under 64 KiB) costs one read request; the primed ones none.
    (1..20).rev().for_each(&read);
    let s = stats_after(&m, Instant::now());
    let reads = s["reads"].as_u64().unwrap() - before["reads"].as_u64().unwrap();
    assert_eq!(reads, 19 - primed, "primed files were read through the daemon: {s}");
    // The big file (over --prime-max-file) is read through the daemon: the counter can move.
    assert_eq!(std::fs::read(mnt.join("big")).unwrap().len(), 3 << 20);
    let after = stats_after(&m, Instant::now());
    assert!(after["reads"].as_u64().unwrap() > s["reads"].as_u64().unwrap(), "{after}");
    assert_eq!(after["primed_files"].as_u64().unwrap(), primed, "{after}");
    let (status, err) = m.stop();
    assert!(status.success(), "{err}");

    // Turned off: the same warm reads prime nothing.
    let m = repo.mount(&snap, &mnt, &["--no-prefetch", "--prime-max-file", "0"]);
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 22);
    read(0);
    read(3);
    let s = stats_after(&m, Instant::now());
    assert_eq!(s["primed_files"], 0, "{s}");
    assert_eq!(s["reads"], 2, "{s}");
    let (status, err) = m.stop();
    assert!(status.success(), "{err}");
}

#[test]
fn host_cache_stays_under_its_cap_through_a_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..8 {
        std::fs::write(src.join(format!("f{i}")), random_bytes(1 << 20, 200 + i)).unwrap();
    }
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let snap = repo.push(&src, &[]);
    let mnt = tmp.path().join("mnt");
    let cap = 2 << 20;
    let m = repo.mount(&snap, &mnt, &["--cache-max", "2MiB", "--cache-min-free", "0B"]);
    for round in 0..2 {
        for i in 0..8 {
            assert_eq!(std::fs::read(mnt.join(format!("f{i}"))).unwrap().len(), 1 << 20, "round {round}");
            let used = du(&repo.cache.path().join("chunks/data"));
            assert!(used <= cap, "cache occupies {used} bytes, cap {cap}");
        }
    }
    std::thread::sleep(Duration::from_millis(1200));
    let s = m.stats();
    assert!(s["cache"]["used_bytes"].as_u64().unwrap() <= cap, "{s}");
    assert!(s["cache"]["evictions"].as_u64().unwrap() > 0, "{s}");
    let (status, err) = m.stop();
    assert!(status.success(), "{err}");
    let stats = repo.json(&["cache", "stats", "--cache-max", "2MiB"]);
    assert!(stats["owner"].as_bool().unwrap() && stats["used_bytes"].as_u64().unwrap() <= cap, "{stats}");
    repo.ok(&["cache", "clear"]);
    assert_eq!(du(&repo.cache.path().join("chunks/data")), 0);
}

fn du(dir: &Path) -> u64 {
    if !dir.exists() {
        return 0;
    }
    // Files may be evicted while we walk.
    files_under(dir).iter().filter_map(|p| p.metadata().ok()).map(|m| m.blocks() * 512).sum()
}

/// Mounting reads the snapshot root and the root directory, nothing that grows with the
/// snapshot: a 1,000,001-entry snapshot mounts with the same requests as a 3-entry one, and the
/// daemon's memory before anything is walked does not grow either.
#[test]
fn million_file_snapshot_mounts_lazily() {
    let tmp = tempfile::tempdir().unwrap();
    // A million inodes are made fastest in memory (tmpfs), where the machine has it.
    let shm = Path::new("/dev/shm");
    let src_tmp = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
    let big = src_tmp.path().join("big");
    for d in 0..1000 {
        let dir = big.join(format!("d{d:04}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..1000 {
            std::fs::File::create(dir.join(format!("f{f:04}"))).unwrap();
        }
    }
    std::fs::write(big.join("d0999/f0999"), b"the last file\n").unwrap();
    let small = tmp.path().join("small");
    std::fs::create_dir_all(small.join("d0999")).unwrap();
    std::fs::write(small.join("d0999/f0999"), b"the last file\n").unwrap();
    std::fs::write(small.join("x"), b"x").unwrap();

    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let big_snap = repo.push(&big, &[]);
    let small_snap = repo.push(&small, &[]);
    let shown = repo.json(&["show", &big_snap]);
    assert_eq!(shown["snapshot"]["stats"]["files"], 1_000_000);

    let mut seen = Vec::new();
    for (name, snap) in [("big", &big_snap), ("small", &small_snap)] {
        let mnt = tmp.path().join(format!("mnt-{name}"));
        let m = repo.mount(snap, &mnt, &["--no-prefetch"]);
        let first = std::fs::read_dir(&mnt).unwrap().count();
        assert!(first >= 1);
        std::thread::sleep(Duration::from_millis(1200));
        let stats = m.stats();
        // Deep paths resolve too, one directory at a time.
        assert_eq!(std::fs::read(mnt.join("d0999/f0999")).unwrap(), b"the last file\n");
        let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", m.pid()))
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().unwrap())
            })
            .unwrap();
        seen.push((stats["requests"].clone(), rss_kib));
        let (status, err) = m.stop();
        assert!(status.success(), "{err}");
    }
    let (big_req, big_rss) = &seen[0];
    let (small_req, small_rss) = &seen[1];
    // The same requests, give or take the two small reads of a pack's table (layout, not size).
    assert_eq!(big_req["lists"], small_req["lists"], "{big_req} vs {small_req}");
    let (big_gets, small_gets) = (big_req["gets"].as_u64().unwrap(), small_req["gets"].as_u64().unwrap());
    assert!(big_gets <= small_gets + 2 && big_gets <= 8, "{big_req} vs {small_req}");
    // Only the root directory of the big snapshot was read, not its million entries.
    assert!(big_req["bytes_down"].as_u64().unwrap() < 256 << 10, "{big_req}");
    // The two trees' first pages are the same size class; allow allocator noise, not growth.
    assert!(*big_rss < small_rss + 32 * 1024, "daemon RSS {big_rss} KiB vs {small_rss} KiB");
}
