//! Failures while pushing and restoring: S3 errors, timeouts, full disks, killed processes.
//! After each, every committed snapshot is intact and nothing half-done looks committed.

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use cairn_store::format::config::Chunking;
use cairn_store::push::{NoProgress, ParentSpec, PushOptions};
use cairn_store::{Kind, Repository};
use cairn_tests::*;
use futures::stream::BoxStream;
use object_store::path::Path as ObjectPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// Wraps a store and fails requests on command, as `object_store`'s own wrappers do.
#[derive(Debug)]
struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    /// Fail puts under this prefix once this many of them have succeeded.
    put_prefix: std::sync::Mutex<Option<(String, usize)>>,
    fail_gets: AtomicBool,
    puts_seen: AtomicUsize,
    /// The next conditional update under this prefix loses its reply: applied and then
    /// reported as a failed precondition (what a retry after a lost reply sees), or not
    /// applied and reported as an error that says nothing (a timeout).
    lose_reply: std::sync::Mutex<Option<(String, bool)>>,
    /// With a lost reply that was applied: another host commits on top before the retry.
    commit_between: AtomicBool,
}

impl FaultStore {
    fn new() -> Arc<FaultStore> {
        Arc::new(FaultStore {
            inner: Arc::new(object_store::memory::InMemory::new()),
            put_prefix: Default::default(),
            fail_gets: AtomicBool::new(false),
            puts_seen: AtomicUsize::new(0),
            lose_reply: Default::default(),
            commit_between: AtomicBool::new(false),
        })
    }
    fn fail_puts(&self, prefix: &str, after: usize) {
        self.puts_seen.store(0, SeqCst);
        *self.put_prefix.lock().unwrap() = Some((prefix.into(), after));
    }
    fn heal(&self) {
        *self.put_prefix.lock().unwrap() = None;
        self.fail_gets.store(false, SeqCst);
    }
    fn injected(path: &ObjectPath) -> object_store::Error {
        object_store::Error::Generic { store: "fault", source: format!("injected failure on {path}").into() }
    }
}

impl fmt::Display for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fault({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if let Some((prefix, after)) = &*self.put_prefix.lock().unwrap() {
            if location.as_ref().starts_with(prefix.as_str()) && self.puts_seen.fetch_add(1, SeqCst) >= *after
            {
                return Err(Self::injected(location));
            }
        }
        let lose = {
            let mut l = self.lose_reply.lock().unwrap();
            match &*l {
                Some((prefix, _))
                    if location.as_ref().starts_with(prefix.as_str())
                        && matches!(opts.mode, object_store::PutMode::Update(_)) =>
                {
                    l.take().map(|(_, applied)| applied)
                }
                _ => None,
            }
        };
        match lose {
            Some(true) => {
                self.inner.put_opts(location, payload, opts).await?;
                if self.commit_between.swap(false, SeqCst) {
                    let bytes = self.inner.get(location).await?.bytes().await?;
                    let mut head = cairn_store::format::volume::Head::decode(&bytes, "head").unwrap();
                    let mut theirs = head.history.last().unwrap().clone();
                    theirs.version += 1;
                    theirs.host = "another-host".into();
                    head.record(theirs);
                    self.inner.put(location, head.encode().into()).await?;
                }
                Err(object_store::Error::Precondition {
                    path: location.to_string(),
                    source: "retried".into(),
                })
            }
            Some(false) => Err(Self::injected(location)),
            None => self.inner.put_opts(location, payload, opts).await,
        }
    }
    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &ObjectPath, options: GetOptions) -> object_store::Result<GetResult> {
        if self.fail_gets.load(SeqCst) && location.as_ref().starts_with("packs/") {
            return Err(Self::injected(location));
        }
        self.inner.get_opts(location, options).await
    }
    async fn get_ranges(
        &self,
        location: &ObjectPath,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        if self.fail_gets.load(SeqCst) && location.as_ref().starts_with("packs/") {
            return Err(Self::injected(location));
        }
        self.inner.get_ranges(location, ranges).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&ObjectPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&ObjectPath>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

fn tree(root: &Path, files: usize, size: usize) {
    std::fs::create_dir_all(root).unwrap();
    for i in 0..files {
        let data: Vec<u8> = (0..size).map(|j| ((j * 31 + i * 7919) % 251) as u8 ^ (j / 4096) as u8).collect();
        std::fs::write(root.join(format!("f{i:04}")), data).unwrap();
    }
}

fn opts(src: &Path) -> PushOptions {
    PushOptions {
        source: src.into(),
        kind: Kind::Fs,
        tags: Default::default(),
        parent: ParentSpec::Auto,
        expire_in: None,
        host: None,
        label: None,
        overlay: None,
    }
}

/// A repository over a [`FaultStore`], with its cache beside it.
async fn fault_repo(dir: &Path) -> (Arc<FaultStore>, Repository) {
    let faults = FaultStore::new();
    let repo = Repository::init_on(faults.clone(), "fault://", Chunking::default(), &dir.join("cache"))
        .await
        .unwrap();
    (faults, repo)
}

async fn restore_to(repo: &Repository, id: &cairn_store::Id, out: &Path) -> cairn_store::Result<()> {
    let snap = repo.load_snapshot(id).await?;
    cairn_store::restore::restore(
        repo,
        &snap,
        None,
        out,
        &cairn_store::restore::NoProgress,
        &AtomicBool::new(false),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_errors_during_push_commit_nothing_and_a_retry_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src, 40, 600_000); // several packs
    let (faults, repo) = fault_repo(tmp.path()).await;
    let cancel = AtomicBool::new(false);
    for (prefix, after) in [("packs/", 1), ("index/", 0), ("snapshots/", 0)] {
        faults.fail_puts(prefix, after);
        let err = cairn_store::push::push(&repo, &opts(&src), &NoProgress, &cancel).await.unwrap_err();
        assert!(err.to_string().contains(prefix), "{prefix}: {err}");
        assert!(repo.snapshot_ids().await.unwrap().is_empty(), "a failed push committed a snapshot");
        let report = cairn_store::commands::check(&repo, true).await.unwrap();
        assert!(report.is_ok(), "{:?}", report.damage);
    }
    faults.heal();
    let summary = cairn_store::push::push(&repo, &opts(&src), &NoProgress, &cancel).await.unwrap();
    let out = tmp.path().join("out");
    restore_to(&repo, &summary.snapshot, &out).await.unwrap();
    assert_same_tree(&src, &out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_errors_fail_the_restore_and_leave_no_file_looking_good() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src, 5, 100_000);
    let (faults, repo) = fault_repo(tmp.path()).await;
    let summary =
        cairn_store::push::push(&repo, &opts(&src), &NoProgress, &AtomicBool::new(false)).await.unwrap();
    faults.fail_gets.store(true, SeqCst);
    let out = tmp.path().join("out");
    let err = restore_to(&repo, &summary.snapshot, &out).await.unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(
        std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0) == 0,
        "files appeared despite read errors"
    );
    faults.heal();
    restore_to(&repo, &summary.snapshot, &out).await.unwrap();
    assert_same_tree(&src, &out);
}

#[test]
fn s3_that_never_answers_times_out_with_a_clear_error() {
    // A server that accepts connections and never replies.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = std::thread::spawn(move || {
        let mut held = Vec::new();
        listener.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            match listener.accept() {
                Ok((s, _)) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
            if held.len() > 20 {
                break;
            }
        }
    });
    let repo = Repo {
        url: "s3://silent/repo".into(),
        cache: tempfile::tempdir().unwrap(),
        env: vec![
            ("AWS_ENDPOINT".into(), format!("http://127.0.0.1:{port}")),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
            ("AWS_ACCESS_KEY_ID".into(), "x".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "x".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("CAIRN_S3_TIMEOUT".into(), "1s".into()),
            ("CAIRN_S3_RETRY_TIMEOUT".into(), "3s".into()),
            ("CAIRN_S3_MAX_RETRIES".into(), "2".into()),
        ],
    };
    let started = Instant::now();
    let out = repo.run(&["snapshots"]);
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config") && (err.contains("timed out") || err.contains("timeout")), "{err}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    drop(hold);
}

#[test]
fn a_full_disk_fails_the_restore_cleanly() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let src = tmp.path().join("src");
    tree(&src, 3, 3_000_000);
    std::fs::write(src.join("small"), "fits").unwrap();
    let id = repo.push(&src, &[]);
    let mnt = tmp.path().join("small-disk");
    let unmount = small_tmpfs(&mnt, "4m");
    let out = repo.run(&["restore", &id, mnt.to_str().unwrap()]);
    let listing: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // Every file that appeared under its name is complete and exact.
    for name in &listing {
        assert!(!name.starts_with(".cairn-restore-"), "temporary {name} left behind");
        assert_eq!(std::fs::read(mnt.join(name)).unwrap(), std::fs::read(src.join(name)).unwrap(), "{name}");
    }
    drop(unmount);
    assert!(!out.status.success(), "restore onto a full disk succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(listing.len() < 4, "not everything can fit: {listing:?}");
}

/// The repository's own disk fills up mid-push (packs are written with O_DIRECT there): the
/// push fails naming the cause, commits nothing, leaves no staging file, and what was
/// committed before stays whole.
#[test]
fn a_full_repository_disk_fails_the_push_cleanly() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("repo-disk");
    let _unmount = small_tmpfs(&disk, "6m");
    let repo = Repo::local(&disk.join("repo"));
    repo.ok(&["init"]);
    let small = tmp.path().join("small");
    std::fs::create_dir(&small).unwrap();
    std::fs::write(small.join("f"), "committed before the disk filled").unwrap();
    let first = repo.push(&small, &[]);
    let big = tmp.path().join("big");
    std::fs::create_dir(&big).unwrap();
    let mut noise = vec![0u8; 3 << 20];
    for i in 0..4 {
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut noise).unwrap();
        std::fs::write(big.join(format!("r{i}")), &noise).unwrap();
    }
    let out = repo.run(&["push", big.to_str().unwrap()]);
    let staging: Vec<_> =
        files_under(&disk).into_iter().filter(|p| p.to_string_lossy().contains('#')).collect();
    let snapshots = repo.json(&["snapshots"]);
    let check = repo.json(&["check", "--read-data"]);
    let restored = tmp.path().join("out");
    let restore = repo.run(&["restore", &first, restored.to_str().unwrap()]);
    assert!(!out.status.success(), "a push of 12 MB into 6 MB succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(staging.is_empty(), "staging files left behind: {staging:?}");
    assert_eq!(snapshots.as_array().unwrap().len(), 1, "{snapshots}");
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
    assert!(restore.status.success(), "{}", String::from_utf8_lossy(&restore.stderr));
    assert_eq!(std::fs::read(restored.join("f")).unwrap(), b"committed before the disk filled");
}

/// A tmpfs of `size` mounted on a new directory `dir`, unmounted when the guard drops (at the
/// end of the test, or when an assertion fails first).
fn small_tmpfs<'a>(dir: &'a Path, size: &str) -> Unmount<'a> {
    std::fs::create_dir(dir).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs on {}", dir.display());
    Unmount(dir)
}

struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn a_killed_push_or_restore_leaves_every_snapshot_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let src = tmp.path().join("src");
    tree(&src, 60, 500_000);
    let first = repo.push(&src, &["--parent", "none"]);
    // Change everything so each push has real work to be killed in.
    for (round, delay_ms) in [20u64, 80, 200, 400, 800].into_iter().enumerate() {
        for i in 0..60 {
            let p = src.join(format!("f{i:04}"));
            let mut data = std::fs::read(&p).unwrap();
            let at = round * 4096 % data.len();
            data[at] ^= 0xff;
            std::fs::write(&p, data).unwrap();
        }
        let mut child = repo
            .cmd(&["push", src.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let check = repo.run(&["check"]);
        assert!(
            check.status.success(),
            "after a kill at {delay_ms} ms:\n{}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
    // Kill a restore, then restore again into the same directory: exact, no leftovers.
    let out = tmp.path().join("out");
    let mut child = repo.cmd(&["restore", &first, out.to_str().unwrap()]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let _ = child.kill();
    let _ = child.wait();
    let again = repo.push(&src, &[]);
    let check = repo.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
    repo.ok(&["restore", &again, out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
}

/// object_store retries a conditional write whose reply was lost, and the retry then fails
/// its precondition although the first attempt landed. A volume commit must see that it
/// won (not delete its own version); and after an error that says nothing about the write,
/// it must keep its snapshot root (the write may still land).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_commit_whose_reply_is_lost_is_neither_lost_nor_doubled() {
    use cairn_store::volume;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src, 3, 10_000);
    let (faults, repo) = fault_repo(tmp.path()).await;
    let cancel = AtomicBool::new(false);
    volume::create(&repo, "v", None).await.unwrap();
    volume::push_dir(&repo, "v", &src, None, &NoProgress, &cancel).await.unwrap();

    *faults.lose_reply.lock().unwrap() = Some(("volumes/".into(), true));
    std::fs::write(src.join("new"), b"landed").unwrap();
    let (summary, head) = volume::push_dir(&repo, "v", &src, None, &NoProgress, &cancel).await.unwrap();
    assert_eq!(head.version, 3);
    assert_eq!(head.snapshot, summary.snapshot);
    let snap = repo.fetch_snapshot(&summary.snapshot).await.expect("the committed version's root is kept");
    let out = tmp.path().join("out");
    restore_to(&repo, &summary.snapshot, &out).await.unwrap();
    assert_same_tree(&src, &out);
    assert_eq!(snap.tags["volume.version"], "3");

    *faults.lose_reply.lock().unwrap() = Some(("volumes/".into(), false));
    std::fs::write(src.join("new"), b"maybe").unwrap();
    let before = repo.snapshot_ids().await.unwrap().len();
    let err = volume::push_dir(&repo, "v", &src, None, &NoProgress, &cancel).await.unwrap_err();
    assert!(!matches!(err, cairn_store::Error::Conflict(_)), "an unknown outcome is not a conflict: {err}");
    assert_eq!(volume::read(&repo, "v").await.unwrap().head.version, 3);
    assert_eq!(
        repo.snapshot_ids().await.unwrap().len(),
        before + 1,
        "the root stays: the write may still land"
    );
    faults.heal();
    let (_, head) = volume::push_dir(&repo, "v", &src, None, &NoProgress, &cancel).await.unwrap();
    assert_eq!(head.version, 4);

    // Landed, reply lost, and another host commits on top before the retry: the writer
    // learns its own version (5), not the other host's (6), so a commit expecting its own
    // head next conflicts instead of overwriting the other host's.
    *faults.lose_reply.lock().unwrap() = Some(("volumes/".into(), true));
    faults.commit_between.store(true, SeqCst);
    std::fs::write(src.join("new"), b"mine").unwrap();
    let (_, head) = volume::push_dir(&repo, "v", &src, None, &NoProgress, &cancel).await.unwrap();
    assert_eq!(head.version, 5);
    assert_eq!(volume::read(&repo, "v").await.unwrap().head.version, 6);
    let err = volume::push_dir(&repo, "v", &src, Some(head.version), &NoProgress, &cancel).await.unwrap_err();
    assert!(matches!(err, cairn_store::Error::Conflict(_)), "{err}");
}

/// A commit that landed but whose record in the writer's state was lost (a crash between
/// the head update and `state.json`): the writer's next commit continues from it; another
/// writer with the same stale expectation gets a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_adopts_its_own_lost_commit_but_not_anothers() {
    use cairn_store::volume::{self, OverlayCommit};
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    tree(&upper, 2, 1_000);
    let (_faults, repo) = fault_repo(tmp.path()).await;
    let cancel = AtomicBool::new(false);
    let head = volume::create(&repo, "v", None).await.unwrap();
    let commit = |writer: &'static str| OverlayCommit {
        name: "v",
        volume_id: &head.id,
        expected: 1, // what a state.json that missed every later commit still says
        base: head.snapshot,
        writer,
    };
    let (_, v2) = volume::commit_overlay(&repo, &commit("w"), &upper, &cancel).await.unwrap();
    assert_eq!(v2.version, 2);
    let (_, v3) = volume::commit_overlay(&repo, &commit("w"), &upper, &cancel).await.unwrap();
    assert_eq!(v3.version, 3, "the writer's own lost commit is adopted");
    let other = volume::commit_overlay(&repo, &commit("x"), &upper, &cancel).await.unwrap_err();
    assert!(matches!(other, cairn_store::Error::Conflict(_)), "{other}");
}
