//! Damaged repositories: every kind of damage gets a clear error naming the object, and no
//! wrong bytes are ever written as if good.

use std::path::{Path, PathBuf};

use cairn_tests::*;

struct Fixture {
    tmp: tempfile::TempDir,
    repo: Repo,
    src: PathBuf,
    id: String,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i.wrapping_mul(2246822519) >> 11) as u8).collect();
    std::fs::write(src.join("d/data"), &data).unwrap();
    std::fs::write(src.join("small"), "hello").unwrap();
    let id = repo.push(&src, &[]);
    Fixture { tmp, repo, src, id }
}

fn packs(repo_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(repo_dir.join("packs")).unwrap() {
        for p in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            out.push(p.unwrap().path());
        }
    }
    out
}

/// The pack holding file data: the biggest one.
fn data_pack(f: &Fixture) -> PathBuf {
    packs(&f.tmp.path().join("repo")).into_iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap()
}

fn restore_fails(f: &Fixture, expect: &str, small_survives: bool) -> PathBuf {
    let out = f.tmp.path().join("out");
    let r = f.repo.run(&["restore", &f.id, out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "restore of a damaged repository succeeded");
    assert!(err.contains(expect), "error does not say {expect:?}:\n{err}");
    // No wrong bytes: the damaged file is absent, the intact one is exact.
    assert!(!out.join("d/data").exists(), "a damaged file was left looking good");
    if small_survives {
        assert_eq!(std::fs::read(out.join("small")).unwrap(), b"hello");
    }
    assert!(std::fs::read_dir(out.join("d")).unwrap().next().is_none(), "temporary file left behind");
    out
}

#[test]
fn corrupt_pack_is_caught_by_restore_and_check() {
    let f = fixture();
    let pack = data_pack(&f);
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[5000] ^= 0x55;
    std::fs::write(&pack, &bytes).unwrap();
    restore_fails(&f, "packs/", true);
    let check = f.repo.run(&["check", "--read-data"]);
    assert_eq!(check.status.code(), Some(3));
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.contains("DAMAGE") && text.contains("/d/data"), "{text}");
    // The structure check (no --read-data) still passes: damage is in the bytes.
    assert!(f.repo.run(&["check"]).status.success());
    let _ = &f.src;
}

#[test]
fn truncated_pack_is_caught() {
    let f = fixture();
    let pack = data_pack(&f);
    let len = std::fs::metadata(&pack).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&pack).unwrap().set_len(len / 2).unwrap();
    restore_fails(&f, "packs/", false);
    let check = f.repo.run(&["check"]);
    assert_eq!(check.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&check.stdout).contains("the index says"));
}

#[test]
fn missing_pack_is_caught() {
    let f = fixture();
    std::fs::remove_file(data_pack(&f)).unwrap();
    restore_fails(&f, "not found", false);
    let check = f.repo.run(&["check"]);
    assert_eq!(check.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&check.stdout).contains("is missing"));
}

#[test]
fn malformed_snapshot_root_is_named() {
    let f = fixture();
    let root = f.tmp.path().join("repo/snapshots").join(&f.id);
    std::fs::write(&root, b"{ not json").unwrap();
    // Listing goes on without it, saying why: one bad root must not stop every push
    // (--parent auto), listing and forget of the repository.
    let r = f.repo.run(&["snapshots"]);
    assert!(r.status.success(), "{r:?}");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains(&format!("snapshots/{}", f.id)) && err.contains("corrupt"), "{err}");
    assert!(!String::from_utf8_lossy(&r.stdout).contains(&f.id[..8]));
    // Asked for by name, it is an error naming it; check reports it as damage.
    let r = f.repo.run(&["show", &f.id]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("corrupt"));
    let check = f.repo.run(&["check"]);
    assert_eq!(check.status.code(), Some(3), "{check:?}");
    assert!(String::from_utf8_lossy(&check.stdout).contains(&f.id[..8]), "{check:?}");
}

#[test]
fn deleting_the_cache_loses_nothing() {
    let f = fixture();
    std::fs::remove_dir_all(f.repo.cache.path()).unwrap();
    let out = f.tmp.path().join("out");
    f.repo.ok(&["restore", &f.id, out.to_str().unwrap()]);
    assert_eq!(std::fs::read(out.join("d/data")).unwrap(), std::fs::read(f.src.join("d/data")).unwrap());
}
