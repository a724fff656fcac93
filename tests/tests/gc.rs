//! `cairn forget` through the real binary: expiry, retention rules, scopes, dry runs.

use std::path::{Path, PathBuf};

use cairn_tests::*;

#[test]
fn forget_applies_expiry_and_retention_and_dry_run_deletes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let mut ids = Vec::new();
    for i in 0..4 {
        std::fs::write(src.join("f"), format!("version {i}")).unwrap();
        let mut extra = vec!["--host", "h1"];
        if i == 0 {
            extra.extend(["--tag", "pin=yes"]);
        }
        if i == 1 {
            extra.extend(["--expire-in", "1s"]);
        }
        ids.push(repo.push(&src, &extra));
    }
    let other = repo.push(&src, &["--host", "h2"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let count = || repo.json(&["snapshots"]).as_array().unwrap().len();
    assert_eq!(count(), 5);

    // Without rules only expiry removes; a dry run only reports it.
    let dry = repo.json(&["forget", "--dry-run"]);
    assert_eq!(dry["removed"], 1, "{dry}");
    let gone: Vec<&str> = dry["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == false)
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(gone, vec![ids[1].as_str()]);
    assert_eq!(count(), 5);
    repo.ok(&["forget"]);
    assert_eq!(count(), 4);

    // keep-last 1 per host+path, pins kept, other hosts out of scope untouched.
    let out = repo.json(&["forget", "--host", "h1", "--keep-last", "1", "--keep-tag", "pin=yes"]);
    assert_eq!(out["removed"], 1, "{out}");
    let left: Vec<String> = repo
        .json(&["snapshots"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let mut expected = vec![ids[0].clone(), ids[3].clone(), other];
    expected.sort();
    let mut left_sorted = left.clone();
    left_sorted.sort();
    assert_eq!(left_sorted, expected);
    // Data of the remaining snapshots is intact (forget removes roots only).
    let check = repo.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
    let out = tmp.path().join("out");
    repo.ok(&["restore", &ids[0], out.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), "version 0");
}

fn write_random(path: &std::path::Path, len: usize, seed: u64) {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    let mut out = vec![0u8; len];
    h.finalize_xof().fill(&mut out);
    std::fs::write(path, out).unwrap();
}

#[test]
fn gc_frees_what_forget_released_and_keeps_the_rest_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    write_random(&a.join("only-a"), 3 << 20, 1);
    write_random(&a.join("shared"), 1 << 20, 2);
    write_random(&b.join("only-b"), 2 << 20, 3);
    write_random(&b.join("shared"), 1 << 20, 2);
    // b first: a's own pack then holds only what a alone has (gc deletes whole dead packs).
    let sb = repo.push(&b, &[]);
    let sa = repo.push(&a, &["--expire-in", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1200));

    // Nothing is unreferenced yet: gc deletes nothing.
    let segments = || index_segments(&tmp.path().join("repo"));
    let before_gc = segments();
    assert_eq!(before_gc.len(), 2, "one segment per push");
    let first = repo.json(&["gc"]);
    assert_eq!(first["packs_deleted"], 0, "{first}");
    // ... and leaves the index alone, so no host has to rebuild its chunk index.
    assert_eq!(first["segments_written"], 0, "{first}");
    assert_eq!(segments(), before_gc);
    repo.ok(&["forget"]);
    let dry = repo.json(&["gc", "--dry-run"]);
    assert!(dry["packs_deleted"].as_u64().unwrap() >= 1, "{dry}");
    let before = repo.json(&["stats"]);
    assert_eq!(repo.json(&["stats"]), before, "a dry run changes nothing");
    let run = repo.json(&["gc"]);
    assert!(run["bytes_freed"].as_u64().unwrap() >= 3 << 20, "only-a's pack is freed: {run}");
    assert_eq!(run["segments_written"], 1, "the index is compacted without the freed pack: {run}");
    assert_eq!(segments().len(), 1);
    let after = repo.json(&["stats"]);
    assert!(after["pack_bytes"].as_u64().unwrap() < before["pack_bytes"].as_u64().unwrap());
    let check = repo.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
    let out = tmp.path().join("out");
    repo.ok(&["restore", &sb, out.to_str().unwrap()]);
    assert_same_tree(&b, &out);
    assert!(!repo.run(&["show", &sa]).status.success());
    // A push after gc deduplicates against what is left and stores what was freed again.
    let again = repo.json(&["push", a.to_str().unwrap()]);
    assert!(again["stats"]["new_bytes"].as_u64().unwrap() >= 3 << 20, "{again}");
    let check = repo.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
}

/// Several real `cairn push` processes against moto while `cairn forget` and `cairn gc` run
/// in a loop; afterwards every snapshot is complete and every chunk verifies.
#[test]
fn concurrent_pushes_and_gc_on_s3_lose_nothing() {
    let moto = Moto::start();
    let repo = Repo::s3(&moto, "gc-stress");
    repo.ok(&["init"]);
    let tmp = tempfile::tempdir().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let dir = tmp.path().join(format!("w{w}"));
        std::fs::create_dir_all(&dir).unwrap();
        let cmd_env = (repo.url.clone(), repo.env.clone());
        writers.push(std::thread::spawn(move || {
            let mut ids = Vec::new();
            for round in 0..4u64 {
                // Some data shared by all writers and rounds, some new each round.
                write_random(&dir.join("shared"), 256 << 10, 77);
                write_random(&dir.join(format!("r{round}")), 512 << 10, w * 100 + round);
                let cache = tempfile::tempdir().unwrap();
                let mut c = std::process::Command::new(cairn_bin());
                c.args(["push", dir.to_str().unwrap(), "--host", &format!("w{w}")])
                    .env("CAIRN_REPO", &cmd_env.0)
                    .env("CAIRN_CACHE_DIR", cache.path());
                for (k, v) in &cmd_env.1 {
                    c.env(k, v);
                }
                let out = c.output().unwrap();
                assert!(out.status.success(), "push failed: {}", String::from_utf8_lossy(&out.stderr));
                ids.push(String::from_utf8(out.stdout).unwrap().lines().last().unwrap().to_string());
            }
            ids
        }));
    }
    let gc_stop = stop.clone();
    let gc_repo = Repo { url: repo.url.clone(), cache: tempfile::tempdir().unwrap(), env: repo.env.clone() };
    let collector = std::thread::spawn(move || {
        let mut runs = 0;
        while !gc_stop.load(std::sync::atomic::Ordering::SeqCst) {
            gc_repo.ok(&["forget", "--keep-last", "2"]);
            let out = gc_repo.run(&["gc", "--json"]);
            // A run may find another still finishing (a conflict); it must never fail otherwise.
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() || err.contains("conflict"), "gc failed: {err}");
            runs += 1;
        }
        runs
    });
    let mut kept = Vec::new();
    for w in writers {
        kept.extend(w.join().unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let runs = collector.join().unwrap();
    assert!(runs >= 1);
    repo.ok(&["gc"]);
    let check = repo.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
    // The newest snapshot of every writer survived retention and restores completely.
    let snaps = repo.json(&["snapshots"]);
    assert!(snaps.as_array().unwrap().len() >= 3, "{snaps}");
    for s in snaps.as_array().unwrap() {
        let id = s["id"].as_str().unwrap();
        let out = tmp.path().join(format!("restore-{id}"));
        repo.ok(&["restore", id, out.to_str().unwrap()]);
    }
}

/// A gc that finds another run's fresh condemnation refuses (exit 4), and one that finds a
/// stale one (a crashed run) takes over and finishes it.
#[test]
fn unfinished_gc_blocks_a_second_run_until_it_is_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    let repo = Repo::local(&dir);
    repo.ok(&["init"]);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_random(&src.join("f"), 100_000, 9);
    let snap = repo.push(&src, &[]);
    let pack = files_under(&dir.join("packs"))[0].clone();
    let now = std::time::SystemTime::now();
    write_gc_state(&dir, "gc-crashed", now, std::slice::from_ref(&pack));
    let out = repo.run(&["gc"]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    // An hour-old unfinished run is taken over; the live pack it condemned is not deleted.
    write_gc_state(
        &dir,
        "gc-crashed",
        now - std::time::Duration::from_secs(3600),
        std::slice::from_ref(&pack),
    );
    let run = repo.json(&["gc", "--lease-timeout", "10m"]);
    assert_eq!(run["packs_deleted"], 0, "{run}");
    assert!(pack.exists());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("gc/state")).unwrap()).unwrap();
    assert_eq!(state["condemned"].as_array().unwrap().len(), 0, "{state}");
    let out = tmp.path().join("out");
    repo.ok(&["restore", &snap, out.to_str().unwrap()]);
}

/// An unfinished gc/state of another run, started at `started`, condemning the pack files.
fn write_gc_state(repo: &Path, run: &str, started: std::time::SystemTime, packs: &[PathBuf]) {
    let ids: Vec<String> =
        packs.iter().map(|p| format!("\"{}\"", p.file_name().unwrap().to_str().unwrap())).collect();
    std::fs::create_dir_all(repo.join("gc")).unwrap();
    let state = format!(
        r#"{{"format": 1, "run": "{run}", "started": "{}", "condemned": [{}]}}"#,
        humantime_rfc3339(started),
        ids.join(", ")
    );
    std::fs::write(repo.join("gc/state"), state).unwrap();
}

fn humantime_rfc3339(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A pack that is mostly dead is rewritten: its live chunks move to a new pack and the old one
/// goes, so forgetting an old version frees its own bytes even when they share a pack.
#[test]
fn gc_repacks_mostly_dead_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_random(&src.join("old"), 3 << 20, 11);
    write_random(&src.join("kept"), 512 << 10, 12);
    repo.push(&src, &[]);
    std::fs::remove_file(src.join("old")).unwrap();
    write_random(&src.join("new"), 256 << 10, 13);
    let latest = repo.push(&src, &[]);
    repo.ok(&["forget", "--keep-last", "1"]);
    let kept_only = repo.json(&["gc", "--repack-below", "0"]);
    assert!(
        kept_only["bytes_freed"].as_u64().unwrap() < 1 << 20,
        "without repacking the mixed pack stays: {kept_only}"
    );
    let run = repo.json(&["gc"]);
    assert!(run["packs_repacked"].as_u64().unwrap() >= 1, "{run}");
    assert!(run["bytes_freed"].as_u64().unwrap() >= 3 << 20, "{run}");
    let check = repo.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
    let out = tmp.path().join("out");
    repo.ok(&["restore", &latest, out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
}

/// A pack left by a push that died before writing its index is deleted, and since the index
/// never named it, the index is not rewritten (which would make every host rebuild its own).
/// Old staging files of killed writers are swept too.
#[test]
fn gc_deletes_a_dead_pushs_pack_without_rewriting_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    let repo = Repo::local(&root);
    repo.ok(&["init"]);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_random(&src.join("f"), 1 << 20, 9);
    let snap = repo.push(&src, &[]);
    let index = || index_segments(&root);
    let before = index();
    let stray = root.join("packs/ab").join(format!("ab{}", "0".repeat(62)));
    std::fs::create_dir_all(stray.parent().unwrap()).unwrap();
    std::fs::write(&stray, b"half a pack").unwrap();
    // And the staging files of writers killed while writing: an old one goes, a fresh one
    // (a writer may still be at it) stays.
    let (old, fresh) = (root.join("packs/ab/abc#1"), root.join("packs/ab/abd#1"));
    let f = std::fs::File::create(&old).unwrap();
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600)).unwrap();
    std::fs::write(&fresh, b"being written").unwrap();
    let run = repo.json(&["gc"]);
    assert_eq!(run["packs_deleted"], 1, "{run}");
    assert_eq!(run["segments_written"], 0, "{run}");
    assert_eq!(run["staging_removed"], 1, "{run}");
    assert!(!stray.exists() && !old.exists() && fresh.exists());
    assert_eq!(index(), before);
    let check = repo.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
    let out = tmp.path().join("out");
    repo.ok(&["restore", &snap, out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
}

/// The names of a local repository's index segments, sorted.
fn index_segments(repo: &std::path::Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> =
        std::fs::read_dir(repo.join("index")).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    names
}

/// A writer that starts after GC condemned a pack stores that pack's chunks again. When it
/// stores exactly the same chunks in the same order, its pack must still get a new name:
/// under the condemned one, GC would delete it after the writer committed.
#[test]
fn a_writer_never_uploads_a_condemned_pack_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    let repo = Repo::local(&dir);
    repo.ok(&["init"]);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_random(&src.join("f"), 100_000, 21);
    repo.push(&src, &[]);
    let condemned: Vec<_> = files_under(&dir.join("packs"));
    let their_index = files_under(&dir.join("index"));
    write_gc_state(&dir, "gc-elsewhere", std::time::SystemTime::now(), &condemned);
    // A fresh host: nothing cached, the same bytes pushed again.
    let other = Repo::local(&dir);
    let again = other.push(&src, &[]);
    let new: Vec<_> =
        files_under(&dir.join("packs")).into_iter().filter(|p| !condemned.contains(p)).collect();
    assert!(!new.is_empty(), "the second push stored its chunks in the condemned packs' names");
    // The first snapshot is forgotten and GC goes on as it would: the index without the
    // condemned packs (here: without the segment naming only them), then the packs (the
    // writer committed after GC's last mark). The second snapshot must not notice.
    other.ok(&["forget", "--keep-last", "1"]);
    for p in their_index.iter().chain(&condemned) {
        std::fs::remove_file(p).unwrap();
    }
    std::fs::remove_file(dir.join("gc/state")).unwrap();
    let fresh = Repo::local(&dir);
    let check = fresh.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
    let out = tmp.path().join("out");
    fresh.ok(&["restore", &again, out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
}

/// A large file's content names its data chunks only through chunk-list pages, which sit in
/// metadata packs that other trees can keep alive after the data is condemned or deleted.
/// An unchanged large file may reuse its cached content only if its data chunks are all
/// still there.
#[test]
fn an_unchanged_large_file_is_read_again_when_its_data_packs_are_condemned() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    let repo = Repo::local(&dir);
    repo.ok(&["init"]);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_random(&src.join("big"), 40 << 20, 31);
    std::thread::sleep(std::time::Duration::from_millis(1200)); // cached only when settled
    repo.push(&src, &[]);
    let again = repo.json(&["push", src.to_str().unwrap()]);
    assert_eq!(again["files_unchanged"], 1, "the change cache is not in use: {again}");

    let is_data = |p: &PathBuf| std::fs::read(p).unwrap()[5] == 0;
    let data: Vec<PathBuf> = files_under(&dir.join("packs")).into_iter().filter(is_data).collect();
    assert!(!data.is_empty());
    write_gc_state(&dir, "gc-elsewhere", std::time::SystemTime::now(), &data);
    let third = repo.json(&["push", src.to_str().unwrap()]);
    assert_eq!(third["files_unchanged"], 0, "reused content whose data is condemned: {third}");
    assert!(third["stats"]["new_chunks"].as_u64().unwrap() > 256, "{third}");
}

/// Ctrl-C stops a gc where it is safe to and releases its claim on gc/state: the next run
/// starts at once (a killed run holds gc/state for the lease timeout) and finishes the job,
/// and nothing live is lost.
#[test]
fn an_interrupted_gc_releases_its_claim_and_the_next_run_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    let repo = Repo::local(&dir);
    repo.ok(&["init"]);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    write_random(&a.join("only-a"), 2 << 20, 11);
    write_random(&b.join("only-b"), 1 << 20, 12);
    repo.push(&a, &["--expire-in", "1s"]);
    let kept = repo.push(&b, &[]);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    repo.ok(&["forget"]);
    // A writer in flight, heartbeat fresh: gc condemns a's pack, then waits for it.
    std::fs::create_dir_all(dir.join("leases")).unwrap();
    let lease = dir.join("leases/writer-in-flight");
    let beat = humantime_rfc3339(std::time::SystemTime::now());
    std::fs::write(
        &lease,
        format!(r#"{{"format": 1, "host": "elsewhere", "pid": 1, "heartbeat": "{beat}", "state": {{"state": "active"}}}}"#),
    )
    .unwrap();
    let mut gc = repo.cmd(&["gc", "--max-wait", "1h"]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let state = || -> serde_json::Value {
        std::fs::read(dir.join("gc/state"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    let waiting = std::time::Instant::now();
    while state()["condemned"].as_array().is_none_or(|c| c.is_empty()) {
        assert!(waiting.elapsed().as_secs() < 60, "gc never condemned anything: {}", state());
        assert!(gc.try_wait().unwrap().is_none(), "gc exited before condemning");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(state()["finished"], false);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(gc.id() as i32), nix::sys::signal::Signal::SIGINT)
        .unwrap();
    let out = gc.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("the next run finishes the job"), "{stderr}");
    // Released, and still condemning: writers keep avoiding those packs until a run decides.
    let released = state();
    assert_eq!(released["finished"], true, "{released}");
    assert!(!released["condemned"].as_array().unwrap().is_empty(), "{released}");

    std::fs::remove_file(&lease).unwrap();
    let run = repo.json(&["gc"]);
    assert!(run["bytes_freed"].as_u64().unwrap() >= 2 << 20, "a's pack is freed: {run}");
    assert_eq!(state()["condemned"].as_array().unwrap().len(), 0, "{}", state());
    let check = repo.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
    let restored = tmp.path().join("restored");
    repo.ok(&["restore", &kept, restored.to_str().unwrap()]);
    assert_same_tree(&b, &restored);
}
