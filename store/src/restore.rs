//! `restore`: write a snapshot into a directory, exactly: data (holes stay holes), modes,
//! owners (when run as root), times, symlinks, hard links, devices, FIFOs, xattrs.
//!
//! Safety: every entry is created by name relative to a directory descriptor we opened
//! with `O_NOFOLLOW`, names were checked when their tree was decoded, and a file appears
//! under its name only after all its chunks were verified and written — a damaged file is
//! reported and never left looking good.

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
    for (old, new) in links {
        if let Err(e) = sys::link(state.root.as_raw_fd(), path_bytes(&old), &state.root, path_bytes(&new)) {
            state.fail(&new, format!("hard link to {}: {e}", old.display()));
        }
    }
    // Children first: a read-only directory can only be made so once it is filled.
    for (rel, node) in dirs.iter().rev() {
        let name = if rel.as_os_str().is_empty() { b".".as_slice() } else { path_bytes(rel) };
        if let Err(e) = apply_meta(&state, &state.root, name, node) {
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
    let mut stack = vec![(root_fd, PathBuf::new(), root.clone())];
    while let Some((fd, rel, dir_node)) = stack.pop() {
        if cancel.load(Relaxed) {
            return Err(Error::Interrupted);
        }
        let NodeKind::Dir { tree } = &dir_node.kind else { unreachable!("only directories are stacked") };
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
                match make_dir(&fd, &node.name) {
                    Ok(sub) => stack.push((Arc::new(sub), child, node)),
                    Err(e) => state.fail(&child, e),
                }
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
            sys::unlink(dir, name.as_bytes(), false)?;
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
    let made = clear_name(&*job.dir, &job.name, false).and_then(|_| match &job.node.kind {
        NodeKind::Symlink { target } => sys::symlink(target, &*job.dir, &job.name),
        NodeKind::CharDevice { rdev } => sys::mknod(&*job.dir, &job.name, libc::S_IFCHR | 0o600, *rdev),
        NodeKind::BlockDevice { rdev } => sys::mknod(&*job.dir, &job.name, libc::S_IFBLK | 0o600, *rdev),
        NodeKind::Fifo => sys::mknod(&*job.dir, &job.name, libc::S_IFIFO | 0o600, 0),
        NodeKind::Socket => sys::mknod(&*job.dir, &job.name, libc::S_IFSOCK | 0o600, 0),
        NodeKind::Dir { .. } | NodeKind::File { .. } => unreachable!("handled by the caller"),
    });
    match made.and_then(|()| apply_meta(state, &*job.dir, &job.name, &job.node)) {
        Ok(()) => {}
        Err(e) => state.fail(&job.rel, e),
    }
    Ok(())
}

/// Owner first (chown clears setuid bits and capabilities), then xattrs, mode, times.
fn apply_meta(state: &State<'_>, dir: &impl AsRawFd, name: &[u8], node: &Node) -> std::io::Result<()> {
    let symlink = matches!(node.kind, NodeKind::Symlink { .. });
    if state.as_root {
        sys::chown(dir, name, node.uid, node.gid)?;
    }
    for x in &node.xattrs {
        if let Err(e) = sys::set_xattr(dir, name, &x.name, &x.value) {
            // Unprivileged restores cannot set trusted.* or security.*; say so, keep going.
            if e.raw_os_error() == Some(libc::EPERM) && !state.as_root {
                tracing::warn!(
                    "{}: xattr {} not restored: {e}",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(&x.name)
                );
                continue;
            }
            return Err(e);
        }
    }
    // After xattrs: a read-only mode would forbid setting them as a normal user.
    if !symlink {
        sys::chmod(dir, name, node.mode)?;
    }
    sys::set_mtime(dir, name, node.mtime_ns)
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
    drop(file);
    clear_name(&*job.dir, &job.name, false).at(&job.rel)?;
    sys::rename(&*job.dir, tmp, &job.name).at(&job.rel)?;
    apply_meta(state, &*job.dir, &job.name, &job.node).at(&job.rel)
}

#[cfg(test)]
mod tests {
    use super::*;

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
