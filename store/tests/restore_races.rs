//! Restore under pressure: few descriptors, and every kind of metadata applied by
//! descriptor rather than by name. Its own binary, so lowering RLIMIT_NOFILE is safe.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use cairn_store::format::config::Chunking;
use cairn_store::push::{self, PushOptions};
use cairn_store::{Kind, Repository, Snapshot};

/// The descriptor limit is per process: tests here run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn repo_in(dir: &Path) -> Repository {
    Repository::init(dir.join("repo").to_str().unwrap(), Chunking::default(), None, &dir.join("cache"))
        .await
        .unwrap()
}

async fn snapshot_of(repo: &Repository, source: &Path) -> Snapshot {
    let cancel = AtomicBool::new(false);
    let opts = PushOptions::new(source, Kind::Fs);
    let summary = push::push(repo, &opts, &push::NoProgress, &cancel).await.unwrap();
    repo.load_snapshot(&summary.snapshot).await.unwrap()
}

async fn restore_into(repo: &Repository, snap: &Snapshot, target: &Path) -> cairn_store::Result<()> {
    let cancel = AtomicBool::new(false);
    cairn_store::restore::restore(repo, snap, None, target, &cairn_store::restore::NoProgress, &cancel)
        .await?;
    Ok(())
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

/// Lowers the soft descriptor limit until dropped.
struct FdLimit(libc::rlimit);

impl FdLimit {
    fn lower_to(soft: u64) -> FdLimit {
        let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: old is a valid rlimit to fill.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
        let new = libc::rlimit { rlim_cur: soft.min(old.rlim_cur), rlim_max: old.rlim_max };
        // SAFETY: a valid rlimit; lowering the soft limit needs no privilege.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) }, 0);
        FdLimit(old)
    }
}

impl Drop for FdLimit {
    fn drop(&mut self) {
        // SAFETY: the limit read before lowering it.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.0) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_wider_than_the_descriptor_limit_restores() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path()).await;
    let source = tmp.path().join("source");
    for i in 0..1500 {
        std::fs::create_dir_all(source.join(format!("wide/d{i:04}/inner"))).unwrap();
    }
    let snap = snapshot_of(&repo, &source).await;
    let target = tmp.path().join("target");
    {
        // Room for the repository's own files and a little more; far fewer than 1500.
        let _limit = FdLimit::lower_to(open_fds() + 128);
        restore_into(&repo, &snap, &target).await.unwrap();
    }
    let restored = std::fs::read_dir(target.join("wide")).unwrap().count();
    assert_eq!(restored, 1500);
    assert!(target.join("wide/d1499/inner").is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_of_every_kind_survives_being_applied_by_descriptor() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path()).await;
    let src = tmp.path().join("source");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    std::fs::create_dir_all(src.join("c/d")).unwrap();
    std::fs::write(src.join("a/b/tool"), "#!/bin/sh\n").unwrap();
    std::fs::hard_link(src.join("a/b/tool"), src.join("c/d/same")).unwrap();
    nix::unistd::mkfifo(&src.join("c/fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
    std::os::unix::fs::symlink("../a/b/tool", src.join("c/link")).unwrap();
    let as_root = nix::unistd::geteuid().is_root();
    if as_root {
        std::os::unix::fs::lchown(src.join("a/b/tool"), Some(1234), Some(1234)).unwrap();
    }
    let with_xattr = xattr::set(src.join("a/b/tool"), "user.cairn", b"kept").is_ok();
    let set_mode =
        |p: &str, m: u32| std::fs::set_permissions(src.join(p), std::fs::Permissions::from_mode(m)).unwrap();
    set_mode("a/b/tool", 0o4751);
    set_mode("c/fifo", 0o604);
    set_mode("a/b", 0o751);
    set_mode("c", 0o555); // read-only: made so only after it is filled
    let snap = snapshot_of(&repo, &src).await;

    let target = tmp.path().join("target");
    restore_into(&repo, &snap, &target).await.unwrap();
    // Again over the first: existing directories, names to replace.
    restore_into(&repo, &snap, &target).await.unwrap();

    for p in ["a", "a/b", "a/b/tool", "c", "c/d", "c/d/same", "c/fifo", "c/link"] {
        let (want, got) = (
            std::fs::symlink_metadata(src.join(p)).unwrap(),
            std::fs::symlink_metadata(target.join(p)).unwrap(),
        );
        assert_eq!(got.mode(), want.mode(), "{p}: mode");
        assert_eq!((got.uid(), got.gid()), (want.uid(), want.gid()), "{p}: owner");
        assert_eq!((got.mtime(), got.mtime_nsec()), (want.mtime(), want.mtime_nsec()), "{p}: mtime");
    }
    let ino = |p: &str| std::fs::metadata(target.join(p)).unwrap().ino();
    assert_eq!(ino("a/b/tool"), ino("c/d/same"), "hard link");
    assert_eq!(std::fs::read_link(target.join("c/link")).unwrap(), Path::new("../a/b/tool"));
    if with_xattr {
        assert_eq!(xattr::get(target.join("a/b/tool"), "user.cairn").unwrap().as_deref(), Some(&b"kept"[..]));
    }
    // Let the tempdir go.
    std::fs::set_permissions(target.join("c"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(src.join("c"), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A default ACL of the target directory is inherited by everything created in it; the
/// restored entries carry only the ACLs of their snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_acl_of_the_target_is_not_inherited() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/f"), b"x").unwrap();
    let repo = repo_in(tmp.path()).await;
    let snap = snapshot_of(&repo, &src).await;
    let target = tmp.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    // user::rwx group::r-x group:1234:rwx mask::rwx other::r-x, as setfacl -d writes it.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in
        [(1u16, 7u16, u32::MAX), (4, 5, u32::MAX), (8, 7, 1234), (0x10, 7, u32::MAX), (0x20, 5, u32::MAX)]
    {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    match xattr::set(&target, "system.posix_acl_default", &acl) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            eprintln!("skipped: no POSIX ACLs on this file system");
            return;
        }
        Err(e) => panic!("setting a default ACL: {e}"),
    }
    // Made in the target, a directory does inherit it: the case the restore must undo.
    std::fs::create_dir(target.join("probe")).unwrap();
    assert!(xattr::get(target.join("probe"), "system.posix_acl_default").unwrap().is_some());
    std::fs::remove_dir(target.join("probe")).unwrap();

    restore_into(&repo, &snap, &target.join("out")).await.unwrap();
    for p in ["out", "out/d", "out/d/f"] {
        for acl in ["system.posix_acl_access", "system.posix_acl_default"] {
            assert_eq!(xattr::get(target.join(p), acl).unwrap(), None, "{p} has {acl}");
        }
    }
    let mode = std::fs::metadata(target.join("out/d/f")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, std::fs::metadata(src.join("d/f")).unwrap().permissions().mode() & 0o7777);
}
