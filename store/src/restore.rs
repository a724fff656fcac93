//! `restore`: write a snapshot into a directory, exactly: data (holes stay holes), modes,
//! owners (when run as root), times, symlinks, hard links, devices, FIFOs, xattrs.
//!
//! Safety: every entry is created by name relative to a directory descriptor we opened
//! with `O_NOFOLLOW`, names were checked when their tree was decoded, and a file appears
//! under its name only after all its chunks were verified and written — a damaged file is
//! reported and never left looking good. No multi-name path is ever resolved: hard links
//! and directory metadata, applied at the end, reach their directory one name at a time.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::backend::RequestStats;
use crate::error::{Error, IoContext, Result};
use crate::format::snapshot::Snapshot;
use crate::format::tree::{Content, Extent, Node, NodeKind};
use crate::id::ChunkId;
use crate::repo::Repository;
use crate::sys;

/// Files are written under a temporary name with this prefix, then renamed into place.
const TEMP_PREFIX: &[u8] = b".cairn-restore-";
/// Small files are restored in batches whose chunks are fetched together, grouped by pack,
/// so neighbouring chunks of many files come in one ranged read instead of one each.
const FILES_PER_BATCH: usize = 512;
/// Plain bytes fetched for one group of small files.
const GROUP_BYTES: u64 = 16 << 20;
/// Batches in flight: fetching one while writing another.
const BATCH_CONCURRENCY: usize = 4;
/// Chunk batches of one big file in flight.
const BATCHES_PER_FILE: usize = 4;
/// Metadata packs up to this size are fetched whole before the walk.
const META_PRELOAD_BUDGET: u64 = 512 << 20;
/// Chunks, and plain bytes, fetched per batch within one file: with `BATCHES_PER_FILE` this
/// bounds a huge file's memory (a memory image's 256 KiB chunks reach the byte limit first).
const CHUNK_BATCH: usize = 64;
const CHUNK_BATCH_BYTES: u64 = 8 << 20;

pub trait RestoreProgress: Sync {
    fn bytes_written(&self, _n: u64) {}
}

pub struct NoProgress;
impl RestoreProgress for NoProgress {}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreSummary {
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    pub bytes: u64,
    pub requests: RequestStats,
    pub seconds: f64,
}

struct FileJob {
    dir: Arc<OwnedFd>,
    name: Vec<u8>,
    rel: PathBuf,
    node: Node,
}

struct State<'a> {
    repo: &'a Repository,
    root: OwnedFd,
    as_root: bool,
    errors: Mutex<Vec<String>>,
    bytes: AtomicU64,
    files: AtomicU64,
    progress: &'a dyn RestoreProgress,
}

impl State<'_> {
    fn fail(&self, rel: &Path, e: impl std::fmt::Display) {
        let msg = format!("{}: {e}", rel.display());
        tracing::error!("{msg}");
        self.errors.lock().expect("errors lock").push(msg);
    }
}

/// Restore `snap` (or the subtree at `subpath`) into `target`, created if missing.
pub async fn restore(
    repo: &Repository,
    snap: &Snapshot,
    subpath: Option<&str>,
    target: &Path,
    progress: &dyn RestoreProgress,
    cancel: &AtomicBool,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let node = match subpath {
        Some(p) => repo.walk_path(&snap.root, p).await?,
        None => snap.root.clone(),
    };
    repo.preload_meta(&snap.meta_packs, META_PRELOAD_BUDGET).await?;
    std::fs::create_dir_all(target).at(target)?;
    let root = sys::open_dir(target).at(target)?;
    remove_stale_temporaries(&root).at(target)?;
    let state = State {
        repo,
        root,
        as_root: nix::unistd::geteuid().is_root(),
        errors: Mutex::default(),
        bytes: AtomicU64::new(0),
        files: AtomicU64::new(0),
        progress,
    };
    let mut summary = RestoreSummary::default();
    let (tx, rx) = mpsc::channel::<FileJob>(256);
    let mut dirs: Vec<(PathBuf, Node)> = Vec::new();
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();

    let walk = async {
        let result = match &node.kind {
            NodeKind::Dir { .. } => {
                walk(&state, &node, tx, &mut dirs, &mut links, &mut summary, cancel).await
            }
            _ => {
                // A single file (a memory image, or a file picked by path) lands in target.
                let dir = Arc::new(state.root.try_clone().at(target)?);
                let job = FileJob {
                    dir,
                    name: node.name.clone(),
                    rel: PathBuf::from(os(&node.name)),
                    node: node.clone(),
                };
                place(&state, job, &tx, &mut links, &mut HashMap::new(), &mut summary).await
            }
        };
        result
    };
    let write = async {
        tokio_stream_of(rx)
            .ready_chunks(FILES_PER_BATCH)
            .map(|jobs| write_batch(&state, jobs))
            .buffer_unordered(BATCH_CONCURRENCY)
            .for_each(|_| async {})
            .await
    };
    let (walked, ()) = tokio::join!(walk, write);
    walked?;
    if cancel.load(Relaxed) {
        return Err(Error::Interrupted);
    }
    let mut parents = Parents::new(&state.root).at(target)?;
    for (old, new) in links {
        if let Err(e) = link_in(&mut parents, &old, &new) {
            state.fail(&new, format!("hard link to {}: {e}", old.display()));
        }
    }
    // Children first: a read-only directory can only be made so once it is filled.
    for (rel, node) in dirs.iter().rev() {
        if let Err(e) = dir_meta(&mut parents, rel, node, state.as_root) {
            state.fail(rel, e);
        }
    }
    summary.files = state.files.load(Relaxed);
    summary.bytes = state.bytes.load(Relaxed);
    summary.requests = repo.requests();
    summary.seconds = started.elapsed().as_secs_f64();
    let errors = state.errors.into_inner().expect("errors lock");
    if !errors.is_empty() {
        let mut report: Vec<String> = errors.iter().take(20).cloned().collect();
        if errors.len() > 20 {
            report.push(format!("... and {} more", errors.len() - 20));
        }
        return Err(Error::Incomplete { failed: errors.len(), report: report.join("\n") });
    }
    Ok(summary)
}

fn tokio_stream_of<T>(mut rx: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn os(name: &[u8]) -> &std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(name)
}

fn path_bytes(p: &Path) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes()
}

/// Reaches the directory holding an end-phase path one name at a time with `O_NOFOLLOW`:
/// whoever owns the target can swap a directory for a symlink while the restore runs, and
/// a path resolved whole would follow it out of the target. Keeps the last directory
/// reached, as consecutive entries often share it.
struct Parents {
    root: Arc<OwnedFd>,
    last: Option<(Vec<u8>, Arc<OwnedFd>)>,
}

impl Parents {
    fn new(root: &OwnedFd) -> std::io::Result<Parents> {
        Ok(Parents { root: Arc::new(root.try_clone()?), last: None })
    }

    /// The directory holding `rel`, and `rel`'s last name.
    fn of<'p>(&mut self, rel: &'p Path) -> std::io::Result<(Arc<OwnedFd>, &'p [u8])> {
        let bytes = path_bytes(rel);
        let (dir, name) = match bytes.iter().rposition(|&b| b == b'/') {
            Some(i) => (&bytes[..i], &bytes[i + 1..]),
            None => (&[][..], bytes),
        };
        single_name(name)?;
        if dir.is_empty() {
            return Ok((self.root.clone(), name));
        }
        if let Some((last, fd)) = &self.last {
            if last.as_slice() == dir {
                return Ok((fd.clone(), name));
            }
        }
        let mut fd = self.root.clone();
        for segment in dir.split(|&b| b == b'/') {
            single_name(segment)?;
            fd = Arc::new(sys::open_subdir(&*fd, segment)?);
        }
        self.last = Some((dir.to_vec(), fd.clone()));
        Ok((fd, name))
    }
}

/// Names were checked when their tree was decoded; this keeps the `*at` calls honest anyway.
fn single_name(name: &[u8]) -> std::io::Result<()> {
    crate::format::tree::check_name(name)
        .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidInput, why))
}

fn link_in(parents: &mut Parents, old: &Path, new: &Path) -> std::io::Result<()> {
    let (old_dir, old_name) = parents.of(old)?;
    let (new_dir, new_name) = parents.of(new)?;
    sys::link(old_dir.as_raw_fd(), old_name, &*new_dir, new_name)
}

fn dir_meta(parents: &mut Parents, rel: &Path, node: &Node, as_root: bool) -> std::io::Result<()> {
    let fd = if rel.as_os_str().is_empty() {
        parents.root.clone()
    } else {
        let (dir, name) = parents.of(rel)?;
        Arc::new(sys::open_subdir(&*dir, name)?)
    };
    apply_meta(as_root, &*fd, node, rel)
}

async fn walk(
    state: &State<'_>,
    root: &Node,
    tx: mpsc::Sender<FileJob>,
    dirs: &mut Vec<(PathBuf, Node)>,
    links: &mut Vec<(PathBuf, PathBuf)>,
    summary: &mut RestoreSummary,
    cancel: &AtomicBool,
) -> Result<()> {
    let mut groups: HashMap<u64, PathBuf> = HashMap::new();
    let root_fd = Arc::new(state.root.try_clone().at(".")?);
    // A directory is opened only when popped: opening all of a wide directory's
    // subdirectories at once would run out of descriptors.
    let mut stack: Vec<(Option<Arc<OwnedFd>>, PathBuf, Node)> = vec![(None, PathBuf::new(), root.clone())];
    while let Some((parent, rel, dir_node)) = stack.pop() {
        if cancel.load(Relaxed) {
            return Err(Error::Interrupted);
        }
        let NodeKind::Dir { tree } = &dir_node.kind else { unreachable!("only directories are stacked") };
        let fd = match parent {
            None => root_fd.clone(),
            Some(parent) => match make_dir(&*parent, &dir_node.name) {
                Ok(fd) => Arc::new(fd),
                Err(e) => {
                    state.fail(&rel, e);
                    continue;
                }
            },
        };
        summary.dirs += 1;
        let nodes = match state.repo.read_dir(tree).await {
            Ok(n) => n,
            Err(e) => {
                state.fail(&rel, e);
                continue;
            }
        };
        dirs.push((rel.clone(), dir_node));
        for node in nodes {
            let child = rel.join(os(&node.name));
            if let NodeKind::Dir { .. } = node.kind {
                stack.push((Some(fd.clone()), child, node));
                continue;
            }
            let job = FileJob { dir: fd.clone(), name: node.name.clone(), rel: child, node };
            place(state, job, &tx, links, &mut groups, summary).await?;
        }
    }
    Ok(())
}

/// Make way for a new entry: an existing non-directory is replaced, a directory is not.
fn clear_name(dir: &impl AsRawFd, name: &[u8], want_dir: bool) -> std::io::Result<bool> {
    match sys::lstat(dir, name)? {
        None => Ok(false),
        Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
            if want_dir {
                Ok(true)
            } else {
                Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "a directory is in the way"))
            }
        }
        Some(_) => sys::unlink(dir, name, false).map(|()| false),
    }
}

fn make_dir(parent: &impl AsRawFd, name: &[u8]) -> std::io::Result<OwnedFd> {
    let existed = clear_name(parent, name, true)?;
    if !existed {
        sys::mkdir(parent, name)?;
    }
    // O_NOFOLLOW: if anything swapped a symlink in, this fails instead of leaving the target.
    let fd = sys::open_subdir(parent, name)?;
    if existed {
        remove_stale_temporaries(&fd)?;
    }
    Ok(fd)
}

/// A restore killed mid-file leaves its temporary behind; the next restore removes it.
fn remove_stale_temporaries(dir: &OwnedFd) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let listing = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
    for entry in listing {
        let name = entry?.file_name();
        if name.as_bytes().starts_with(TEMP_PREFIX) {
            match sys::unlink(dir, name.as_bytes(), false) {
                // Restore never makes a directory so named; it is not ours to remove.
                Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {}
                r => r?,
            }
        }
    }
    Ok(())
}

/// Everything but a directory: files go to the writers, the rest is made here.
async fn place(
    state: &State<'_>,
    job: FileJob,
    tx: &mpsc::Sender<FileJob>,
    links: &mut Vec<(PathBuf, PathBuf)>,
    groups: &mut HashMap<u64, PathBuf>,
    summary: &mut RestoreSummary,
) -> Result<()> {
    if let Some(group) = job.node.link_group {
        match groups.get(&group) {
            Some(first) => {
                if let Err(e) = clear_name(&*job.dir, &job.name, false) {
                    state.fail(&job.rel, e);
                } else {
                    links.push((first.clone(), job.rel));
                }
                return Ok(());
            }
            None => {
                groups.insert(group, job.rel.clone());
            }
        }
    }
    if let NodeKind::File { .. } = job.node.kind {
        return tx.send(job).await.map_err(|_| Error::Interrupted);
    }
    summary.others += 1;
    if let Err(e) = make_special(state.as_root, &job) {
        state.fail(&job.rel, e);
    }
    Ok(())
}

fn make_special(as_root: bool, job: &FileJob) -> std::io::Result<()> {
    let (dir, name) = (&*job.dir, job.name.as_slice());
    clear_name(dir, name, false)?;
    let mknod =
        |format: libc::mode_t, rdev: u64| sys::mknod(dir, name, format | 0o600, rdev).map(|()| format);
    let format = match &job.node.kind {
        NodeKind::Symlink { target } => {
            sys::symlink(target, dir, name)?;
            return apply_symlink_meta(as_root, dir, name, &job.node, &job.rel);
        }
        NodeKind::CharDevice { rdev } => mknod(libc::S_IFCHR, *rdev)?,
        NodeKind::BlockDevice { rdev } => mknod(libc::S_IFBLK, *rdev)?,
        NodeKind::Fifo => mknod(libc::S_IFIFO, 0)?,
        NodeKind::Socket => mknod(libc::S_IFSOCK, 0)?,
        NodeKind::Dir { .. } | NodeKind::File { .. } => unreachable!("handled by the caller"),
    };
    // By descriptor: a chmod by name would follow a symlink swapped in since the mknod.
    let fd = sys::open_path(dir, name)?;
    if sys::fstat(&fd)?.st_mode & libc::S_IFMT != format {
        return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "replaced while being restored"));
    }
    apply_meta(as_root, &fd, &job.node, &job.rel)
}

/// Owner first (chown clears setuid bits and capabilities), then xattrs, mode, times; all
/// through a descriptor of the object itself, so no name is resolved again.
const INHERITED_ACLS: [&[u8]; 2] = [b"system.posix_acl_access", b"system.posix_acl_default"];

fn apply_meta(as_root: bool, fd: &impl AsRawFd, node: &Node, rel: &Path) -> std::io::Result<()> {
    if as_root {
        sys::fchown(fd, node.uid, node.gid)?;
    }
    // A target directory with a default ACL hands it to everything made in it: the node's
    // permissions are its mode and its own ACLs only.
    for acl in INHERITED_ACLS {
        if !node.xattrs.iter().any(|x| x.name == acl) {
            sys::fremove_xattr(fd, acl)?;
        }
    }
    set_xattrs(as_root, node, rel, |attr, value| sys::fset_xattr(fd, attr, value))?;
    // After xattrs: a read-only mode would forbid setting them as a normal user.
    sys::fchmod(fd, node.mode)?;
    sys::fset_mtime(fd, node.mtime_ns)
}

/// A symlink cannot be opened to act on, so it is reached by its one name below `dir`,
/// never followed. It has no mode of its own.
fn apply_symlink_meta(
    as_root: bool,
    dir: &impl AsRawFd,
    name: &[u8],
    node: &Node,
    rel: &Path,
) -> std::io::Result<()> {
    if as_root {
        sys::chown(dir, name, node.uid, node.gid)?;
    }
    set_xattrs(as_root, node, rel, |attr, value| sys::set_xattr(dir, name, attr, value))?;
    sys::set_mtime(dir, name, node.mtime_ns)
}

fn set_xattrs(
    as_root: bool,
    node: &Node,
    rel: &Path,
    set: impl Fn(&[u8], &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    for x in &node.xattrs {
        if let Err(e) = set(&x.name, &x.value) {
            // Unprivileged restores cannot set trusted.* or security.*; say so, keep going.
            if e.raw_os_error() == Some(libc::EPERM) && !as_root {
                tracing::warn!(
                    "{}: xattr {} not restored: {e}",
                    rel.display(),
                    String::from_utf8_lossy(&x.name)
                );
                continue;
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Restore a batch of files: small ones in groups sharing one fetch, big ones alone.
async fn write_batch(state: &State<'_>, jobs: Vec<FileJob>) {
    let mut group: Vec<FileJob> = Vec::new();
    let mut group_bytes = 0;
    for job in jobs {
        let small = match &job.node.kind {
            NodeKind::File { size, content: Content::Extents(e) } => {
                *size <= GROUP_BYTES && e.len() <= CHUNK_BATCH
            }
            _ => false,
        };
        if !small {
            write_file(state, job, None).await;
            continue;
        }
        group_bytes += job.node.size();
        group.push(job);
        if group_bytes >= GROUP_BYTES {
            write_group(state, std::mem::take(&mut group)).await;
            group_bytes = 0;
        }
    }
    write_group(state, group).await;
}

async fn write_group(state: &State<'_>, group: Vec<FileJob>) {
    let ids: Vec<ChunkId> = group
        .iter()
        .flat_map(|job| match &job.node.kind {
            NodeKind::File { content: Content::Extents(e), .. } => e.iter().filter_map(|e| e.chunk).collect(),
            _ => Vec::new(),
        })
        .collect();
    // On a failed group fetch, each file fetches on its own, so damage is pinned to its files.
    let fetched = if ids.is_empty() { None } else { state.repo.read_chunks(&ids).await.ok() };
    futures::stream::iter(group)
        .map(|job| write_file(state, job, fetched.as_ref()))
        .buffer_unordered(8)
        .for_each(|_| async {})
        .await;
}

async fn write_file(state: &State<'_>, job: FileJob, fetched: Option<&HashMap<ChunkId, Arc<Vec<u8>>>>) {
    let mut tmp = TEMP_PREFIX.to_vec();
    tmp.extend_from_slice(hex::encode(rand::random::<[u8; 8]>()).as_bytes());
    match write_content(state, &job, &tmp, fetched).await {
        Ok(()) => {
            state.files.fetch_add(1, Relaxed);
        }
        Err(e) => {
            let _ = sys::unlink(&*job.dir, &tmp, false);
            state.fail(&job.rel, e);
        }
    }
}

async fn write_chunks(
    state: &State<'_>,
    job: &FileJob,
    file: &std::fs::File,
    batch: &[(u64, Extent)],
    fetched: Option<&HashMap<ChunkId, Arc<Vec<u8>>>>,
) -> Result<()> {
    let ids: Vec<_> = batch.iter().filter_map(|(_, e)| e.chunk).collect();
    let data = match fetched {
        Some(f) if ids.iter().all(|id| f.contains_key(id)) => std::borrow::Cow::Borrowed(f),
        _ => std::borrow::Cow::Owned(state.repo.read_chunks(&ids).await?),
    };
    for (off, e) in batch {
        let id = e.chunk.expect("only chunks are batched");
        let bytes = &data[&id];
        if bytes.len() as u64 != e.len {
            return Err(Error::corrupt(format!("chunk {id}"), "length differs from its extent"));
        }
        file.write_all_at(bytes, *off).at(&job.rel)?;
        state.bytes.fetch_add(bytes.len() as u64, Relaxed);
        state.progress.bytes_written(bytes.len() as u64);
    }
    Ok(())
}

/// Consecutive runs of at most `CHUNK_BATCH` chunks and about `CHUNK_BATCH_BYTES` bytes.
fn batches(chunks: &[(u64, Extent)]) -> Vec<&[(u64, Extent)]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, (_, e)) in chunks.iter().enumerate() {
        if i > start && (i - start == CHUNK_BATCH || bytes + e.len > CHUNK_BATCH_BYTES) {
            out.push(&chunks[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += e.len;
    }
    if start < chunks.len() {
        out.push(&chunks[start..]);
    }
    out
}

async fn write_content(
    state: &State<'_>,
    job: &FileJob,
    tmp: &[u8],
    fetched: Option<&HashMap<ChunkId, Arc<Vec<u8>>>>,
) -> Result<()> {
    let NodeKind::File { size, content } = &job.node.kind else { unreachable!("only files are jobs") };
    let file = sys::create_file(&*job.dir, tmp).at(&job.rel)?;
    let extents = state.repo.extents(content).await?;
    let mut offset = 0u64;
    let mut placed: Vec<(u64, Extent)> = Vec::with_capacity(extents.len());
    for e in extents {
        placed.push((offset, e));
        offset += e.len;
    }
    let chunks: Vec<(u64, Extent)> = placed.into_iter().filter(|(_, e)| e.chunk.is_some()).collect();
    // Batches of a big file are fetched and written concurrently; pwrite needs no order.
    futures::stream::iter(batches(&chunks))
        .map(|batch| write_chunks(state, job, &file, batch, fetched))
        .buffer_unordered(BATCHES_PER_FILE)
        .try_collect::<()>()
        .await?;
    // Extending, not writing, the tail keeps trailing holes as holes.
    file.set_len(*size).at(&job.rel)?;
    // Before the rename, on our own descriptor: after it the name could be anything.
    // Nothing writes after this, so setuid bits and capabilities stay; rename keeps mtime.
    apply_meta(state.as_root, &file, &job.node, &job.rel).at(&job.rel)?;
    drop(file);
    clear_name(&*job.dir, &job.name, false).at(&job.rel)?;
    sys::rename(&*job.dir, tmp, &job.name).at(&job.rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn dir_node(mode: u32, uid: u32) -> Node {
        Node {
            name: b"d".to_vec(),
            kind: NodeKind::Dir { tree: ChunkId::of(b"tree") },
            mode,
            uid,
            gid: uid,
            mtime_ns: 1_000_000_000,
            xattrs: vec![],
            link_group: None,
        }
    }

    #[test]
    fn end_phases_do_not_follow_a_directory_swapped_for_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(outside.join("b")).unwrap();
        std::fs::write(outside.join("x"), "secret").unwrap();
        let target = tmp.path().join("target");
        std::fs::create_dir_all(target.join("c")).unwrap();
        std::fs::write(target.join("c/z"), "ours").unwrap();
        // "a" was a directory of the restore; its owner swapped it for a link out.
        std::os::unix::fs::symlink(&outside, target.join("a")).unwrap();
        let before = |p: &str| std::fs::symlink_metadata(outside.join(p)).unwrap();
        let (b_before, outside_before) = (before("b"), before(""));

        let as_root = nix::unistd::geteuid().is_root();
        let root = sys::open_dir(&target).unwrap();
        let mut parents = Parents::new(&root).unwrap();
        let node = dir_node(0o4700, 4242);
        for rel in ["a/b", "a"] {
            let got = dir_meta(&mut parents, Path::new(rel), &node, as_root);
            assert!(got.is_err(), "{rel}: metadata applied through the symlink");
        }
        for (old, new) in [("a/x", "c/y"), ("c/z", "a/y"), ("c/z", "a/b/y")] {
            let got = link_in(&mut parents, Path::new(old), Path::new(new));
            assert!(got.is_err(), "{old} -> {new}: linked through the symlink");
        }
        for (path, was) in [("b", &b_before), ("", &outside_before)] {
            let now = before(path);
            assert_eq!(
                (now.mode(), now.uid(), now.mtime()),
                (was.mode(), was.uid(), was.mtime()),
                "{path:?}"
            );
        }
        assert!(!target.join("c/y").exists() && !outside.join("y").exists() && !outside.join("b/y").exists());

        // Through real directories the same calls work (links first, as in a restore).
        link_in(&mut parents, Path::new("c/z"), Path::new("c/w")).unwrap();
        dir_meta(&mut parents, Path::new("c"), &node, as_root).unwrap();
        let c = std::fs::metadata(target.join("c")).unwrap();
        assert_eq!((c.mode() & 0o7777, c.mtime()), (0o4700, 1));
        if as_root {
            assert_eq!(c.uid(), 4242);
        }
        assert_eq!(
            std::fs::metadata(target.join("c/w")).unwrap().ino(),
            std::fs::metadata(target.join("c/z")).unwrap().ino()
        );
    }

    #[test]
    fn stale_temporaries_are_removed_but_a_directory_so_named_is_left() {
        let tmp = tempfile::tempdir().unwrap();
        let stale = format!("{}0123", String::from_utf8_lossy(TEMP_PREFIX));
        std::fs::write(tmp.path().join(&stale), "half a file").unwrap();
        std::fs::create_dir(tmp.path().join(format!("{stale}-dir"))).unwrap();
        remove_stale_temporaries(&sys::open_dir(tmp.path()).unwrap()).unwrap();
        assert!(!tmp.path().join(&stale).exists());
        assert!(tmp.path().join(format!("{stale}-dir")).is_dir());
    }

    #[test]
    fn batches_cover_every_chunk_in_order_within_both_limits() {
        for (count, len) in [(0usize, 1u64), (1, 64 << 20), (200, 64 << 10), (100, 256 << 10), (7, 3 << 20)] {
            let chunks: Vec<(u64, Extent)> = (0..count)
                .map(|i| (i as u64 * len, Extent { chunk: Some(ChunkId::of(&i.to_le_bytes())), len }))
                .collect();
            let got = batches(&chunks);
            assert_eq!(got.concat(), chunks, "{count} chunks of {len}");
            for (i, b) in got.iter().enumerate() {
                assert!(!b.is_empty() && b.len() <= CHUNK_BATCH);
                let bytes: u64 = b.iter().map(|(_, e)| e.len).sum();
                assert!(b.len() == 1 || bytes <= CHUNK_BATCH_BYTES, "{count} x {len}: batch of {bytes}");
                // Full: the next chunk would have broken a limit.
                if let Some(next) = got.get(i + 1) {
                    let full = b.len() == CHUNK_BATCH || bytes + next[0].1.len > CHUNK_BATCH_BYTES;
                    assert!(full, "{count} x {len}: batch {i} could have taken one more");
                }
            }
        }
    }
}
