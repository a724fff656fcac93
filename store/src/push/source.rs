//! Reading the source: walk a directory tree in parallel (rayon), turn each entry into a
//! [`Node`], chunk and hash file data, and hand new chunks to the [`Packer`].

use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::packer::Packer;
use super::PushProgress;
use crate::cache::{FileEntry, LocalCache};
use crate::error::{Error, IoContext, Result};
use crate::format::config::{Chunking, MemoryCut};
use crate::format::pack::PackKind;
use crate::format::tree::{self, Content, Extent, Node, NodeKind, Tree, Xattr};
use crate::id::{Id, PackId};

/// Bytes read from a file at a time; also the unit of parallel hashing within one file.
const READ_BUF: usize = 8 << 20;

/// How a file's bytes are cut into chunks.
#[derive(Clone, Copy, Debug)]
pub enum Chunker {
    /// Content-defined (FastCDC 2020) for files: insertions shift no boundaries far away.
    Cdc { min: u32, avg: u32, max: u32 },
    /// Fixed, page-aligned for memory images: all-zero chunks become holes.
    Fixed { size: u32 },
    /// Page-aligned content-defined for memory images (see [`page_cuts`]): runs of zero
    /// pages become holes.
    Pages { min: u32, avg: u32, max: u32 },
}

const PAGE: usize = 4096;

impl Chunker {
    pub fn fs(c: &Chunking) -> Chunker {
        Chunker::Cdc { min: c.fs_min, avg: c.fs_avg, max: c.fs_max }
    }
    pub fn memory(c: &Chunking) -> Chunker {
        match c.memory_cut {
            MemoryCut::Fixed => Chunker::Fixed { size: c.memory },
            MemoryCut::Pages => Chunker::Pages { min: c.memory / 4, avg: c.memory, max: c.memory * 4 },
        }
    }

    fn is_memory(&self) -> bool {
        !matches!(self, Chunker::Cdc { .. })
    }
}

#[derive(Default)]
pub struct Counts {
    pub files: AtomicU64,
    pub dirs: AtomicU64,
    pub others: AtomicU64,
    pub bytes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub chunks: AtomicU64,
    pub new_chunks: AtomicU64,
    pub new_bytes: AtomicU64,
    pub files_unchanged: AtomicU64,
}

pub struct Walker<'a> {
    pub cache: &'a LocalCache,
    pub packer: &'a Packer<'a>,
    pub chunker: Chunker,
    /// Reuse unchanged files from the change cache (only when there is a parent).
    pub use_file_cache: bool,
    /// Files changed this recently are not trusted to the change cache (racy timestamps).
    pub started_ns: i64,
    pub counts: Counts,
    pub meta_packs: Mutex<std::collections::HashSet<PackId>>,
    /// Packs a garbage collection condemned: their chunks count as absent (stored again).
    pub condemned: &'a std::collections::HashSet<PackId>,
    pub cancel: &'a AtomicBool,
    pub progress: &'a dyn PushProgress,
    /// Set for an overlay commit (see [`super::overlay`]).
    pub overlay: Option<super::overlay::Overlay<'a>>,
}

/// The hard-link group of a file with more than one link. (dev, inode) alone repeats across
/// pushes (inode numbers are reused, devices look alike), and an overlay commit keeps the
/// base's groups beside new ones: two unrelated files would share a group, and a mount or a
/// restore would give one the other's bytes. With the inode's size and mtime (the same for
/// all its links) they do not meet, while an unchanged group keeps its value from push to
/// push, so its directories still deduplicate. BLAKE3 rather than std's hasher, whose
/// output may change between Rust releases.
fn link_group(meta: &Metadata) -> u64 {
    let mut h = blake3::Hasher::new();
    for v in [meta.dev(), meta.ino(), meta.size(), meta.mtime() as u64, meta.mtime_nsec() as u64] {
        h.update(&v.to_le_bytes());
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

pub(super) fn nanos(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

impl Walker<'_> {
    /// Push a directory tree; returns its root node, named `name`.
    pub fn dir(&self, path: &Path, name: Vec<u8>) -> Result<Node> {
        let meta = std::fs::symlink_metadata(path).at(path)?;
        if !meta.is_dir() {
            return Err(Error::Usage(format!(
                "{} is not a directory (use --kind memory for an image file)",
                path.display()
            )));
        }
        self.node(path, path, name, &meta)
    }

    /// Push one file (a memory image); returns its node, named `name`.
    pub fn file(&self, path: &Path, name: Vec<u8>) -> Result<Node> {
        // A symlink to the image is followed here, once, as the user named it.
        let at = std::fs::canonicalize(path).at(path)?;
        let meta = std::fs::symlink_metadata(&at).at(path)?;
        if !meta.is_file() {
            return Err(Error::Usage(format!("{} is not a regular file", path.display())));
        }
        self.node(path, &at, name, &meta)
    }

    /// The node of the entry `path` names, reached at `at` (see [`Anchored`]), whose lstat is
    /// `meta`.
    pub(super) fn node(&self, path: &Path, at: &Path, name: Vec<u8>, meta: &Metadata) -> Result<Node> {
        if self.cancel.load(Relaxed) {
            return Err(Error::Interrupted);
        }
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            self.counts.dirs.fetch_add(1, Relaxed);
            NodeKind::Dir { tree: self.tree(path, at, meta)? }
        } else if ft.is_file() {
            self.counts.files.fetch_add(1, Relaxed);
            let (size, content) = self.file_content(path, at, meta)?;
            self.counts.bytes.fetch_add(size, Relaxed);
            self.progress.file_done(size);
            NodeKind::File { size, content }
        } else {
            self.counts.others.fetch_add(1, Relaxed);
            if ft.is_symlink() {
                NodeKind::Symlink { target: std::fs::read_link(at).at(path)?.into_os_string().into_vec() }
            } else if ft.is_char_device() {
                NodeKind::CharDevice { rdev: meta.rdev() }
            } else if ft.is_block_device() {
                NodeKind::BlockDevice { rdev: meta.rdev() }
            } else if ft.is_fifo() {
                NodeKind::Fifo
            } else {
                NodeKind::Socket
            }
        };
        let link_group = (!ft.is_dir() && meta.nlink() > 1).then(|| link_group(meta));
        Ok(Node {
            name,
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime_ns: nanos(meta.mtime(), meta.mtime_nsec()),
            xattrs: self.xattrs(at).map_err(|e| match e {
                Error::Io { source, .. } => Error::io(path, source),
                e => e,
            })?,
            link_group,
        })
    }

    /// A node's extended attributes; an overlay commit drops overlayfs's own bookkeeping.
    pub(super) fn xattrs(&self, path: &Path) -> Result<Vec<Xattr>> {
        let mut all = read_xattrs(path)?;
        if self.overlay.is_some() {
            all.retain(|x| !x.name.starts_with(super::overlay::XATTR_PREFIX));
        }
        Ok(all)
    }

    fn tree(&self, path: &Path, at: &Path, meta: &Metadata) -> Result<Id> {
        let dir = Anchored::open(at, meta, libc::O_DIRECTORY).at(path)?;
        let mut entries: Vec<Vec<u8>> = std::fs::read_dir(dir.at())
            .at(path)?
            .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
            .collect::<std::io::Result<_>>()
            .at(path)?;
        entries.sort_unstable();
        let nodes: Vec<Option<Node>> = entries
            .into_par_iter()
            .map(|name| {
                let child = path.join(OsStr::from_bytes(&name));
                let child_at = dir.at().join(OsStr::from_bytes(&name));
                self.settled(&child, &child_at, |meta| {
                    self.node(&child, &child_at, name.clone(), meta).map(Some)
                })
            })
            .collect::<Result<_>>()?;
        self.store_tree(nodes.into_iter().flatten().collect())
    }

    /// What `take` makes of the entry at `at` (named `path`), taken again from a fresh lstat
    /// if the entry changed between its lstat and its open (a rename over it: an editor's
    /// save, git rewriting its index); `None` once it is gone, or if it keeps changing.
    pub(super) fn settled<T>(
        &self,
        path: &Path,
        at: &Path,
        take: impl Fn(&Metadata) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        for _ in 0..3 {
            let meta = match std::fs::symlink_metadata(at) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!("{} vanished during the push; skipped", path.display());
                    return Ok(None);
                }
                Err(e) => return Err(Error::io(path, e)),
            };
            match take(&meta) {
                // Gone or replaced after the lstat: opened, listed or its xattrs read.
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => continue,
                other => return other,
            }
        }
        tracing::warn!("{} kept changing during the push; skipped", path.display());
        Ok(None)
    }

    /// Encode a directory (nodes in name order) and store its objects; returns its id.
    pub(super) fn store_tree(&self, nodes: Vec<Node>) -> Result<Id> {
        let objects = Tree::build(nodes);
        let top = objects.last().expect("build returns the top object").id;
        for obj in objects {
            self.store_meta(obj.id, &obj.bytes)?;
        }
        Ok(top)
    }

    /// Where an already stored chunk lives, unless only a condemned pack holds it.
    fn known(&self, id: &Id) -> Result<Option<crate::cache::Location>> {
        Ok(self.cache.chunk(id)?.filter(|loc| !self.condemned.contains(&loc.pack)))
    }

    fn store_meta(&self, id: Id, bytes: &[u8]) -> Result<()> {
        if let Some(loc) = self.known(&id)? {
            self.meta_packs.lock().expect("meta lock").insert(loc.pack);
        } else if self.packer.claim(id) {
            self.packer.add(PackKind::Meta, id, bytes)?;
        }
        Ok(())
    }

    fn file_content(&self, path: &Path, at: &Path, meta: &Metadata) -> Result<(u64, Content)> {
        let key = path.as_os_str().as_bytes();
        let ctime_ns = nanos(meta.ctime(), meta.ctime_nsec());
        let mtime_ns = nanos(meta.mtime(), meta.mtime_nsec());
        if self.use_file_cache {
            if let Some(hit) = self.cache.file(key)? {
                if hit.dev == meta.dev()
                    && hit.ino == meta.ino()
                    && hit.size == meta.size()
                    && hit.mtime_ns == mtime_ns
                    && hit.ctime_ns == ctime_ns
                    && self.content_stored(&hit)?
                {
                    self.counts.files_unchanged.fetch_add(1, Relaxed);
                    return Ok((hit.size, hit.content));
                }
            }
        }
        let file = File::from(Anchored::open(at, meta, 0).at(path)?.fd);
        let extents = self.chunk_file(&file, meta, path)?;
        let size = extents.iter().map(|e| e.len).sum();
        let data_chunks: Vec<Id> = extents.iter().filter_map(|e| e.chunk).collect();
        let (content, objects) = tree::build_content(extents);
        for obj in objects {
            self.store_meta(obj.id, &obj.bytes)?;
        }
        if ctime_ns < self.started_ns - 1_000_000_000 && size == meta.size() {
            let entry = FileEntry {
                dev: meta.dev(),
                ino: meta.ino(),
                size,
                mtime_ns,
                ctime_ns,
                list_chunks: if matches!(content, Content::Lists(_)) { data_chunks } else { Vec::new() },
                content: content.clone(),
            };
            self.cache.put_file(key, &entry)?;
        }
        Ok((size, content))
    }

    /// Every chunk a cached file names, directly or through its lists, is in the index
    /// outside condemned packs (so it may be referenced again).
    fn content_stored(&self, hit: &FileEntry) -> Result<bool> {
        match &hit.content {
            Content::Extents(ex) => {
                for id in ex.iter().filter_map(|e| e.chunk) {
                    if self.known(&id)?.is_none() {
                        return Ok(false);
                    }
                }
            }
            Content::Lists(pages) => {
                if hit.list_chunks.is_empty() {
                    return Ok(false);
                }
                for id in &hit.list_chunks {
                    if self.known(id)?.is_none() {
                        return Ok(false);
                    }
                }
                for p in pages {
                    match self.known(&p.id)? {
                        Some(loc) => self.meta_packs.lock().expect("meta lock").insert(loc.pack),
                        None => return Ok(false),
                    };
                }
            }
        }
        Ok(true)
    }

    /// Chunk a file: data ranges (from SEEK_DATA/SEEK_HOLE) are chunked, holes stay holes.
    fn chunk_file(&self, file: &File, meta: &Metadata, path: &Path) -> Result<Vec<Extent>> {
        let size = meta.size();
        let maybe_sparse = meta.blocks() * 512 < size || self.chunker.is_memory();
        let ranges = if maybe_sparse { data_ranges(file, size).at(path)? } else { whole(size) };
        let mut extents = Vec::new();
        let mut pos = 0;
        for range in ranges {
            let (start, end) = match self.chunker {
                // Fixed chunks sit on a grid of the chunk size so equal pages line up across images.
                Chunker::Fixed { size: cs } => {
                    let cs = cs as u64;
                    ((range.start / cs * cs).max(pos), range.end.div_ceil(cs).saturating_mul(cs).min(size))
                }
                // Data ranges widened to whole pages, so page content decides the cuts.
                Chunker::Pages { .. } => {
                    let p = PAGE as u64;
                    ((range.start / p * p).max(pos), range.end.div_ceil(p).saturating_mul(p).min(size))
                }
                Chunker::Cdc { .. } => (range.start, range.end),
            };
            if start >= end {
                continue;
            }
            if start > pos {
                push_extent(&mut extents, Extent { chunk: None, len: start - pos });
            }
            let reached = self.chunk_range(file, start, end, &mut extents).at(path)?;
            if reached < end {
                // Truncated while read: a hole keeps every later range at its own offset.
                tracing::warn!(
                    "{} shrank while it was read; its missing part is stored as a hole",
                    path.display()
                );
                push_extent(&mut extents, Extent { chunk: None, len: end - reached });
            }
            pos = end;
        }
        if size > pos {
            push_extent(&mut extents, Extent { chunk: None, len: size - pos });
        }
        Ok(extents)
    }

    /// Chunk `start..end` of a file; returns where the data ended (before `end` if the file
    /// was truncated meanwhile). Two buffers: while the chunks of one are hashed and
    /// compressed (in parallel), the next is read, so one big file keeps both cores busy.
    fn chunk_range(&self, file: &File, start: u64, end: u64, out: &mut Vec<Extent>) -> std::io::Result<u64> {
        let unit = match self.chunker {
            // A whole number of fixed chunks, so chunks stay on the grid.
            Chunker::Fixed { size } => (READ_BUF / size as usize).max(1) * size as usize,
            // Room for at least two maximal chunks, so a cut is never forced by the buffer.
            Chunker::Cdc { max, .. } | Chunker::Pages { max, .. } => READ_BUF.max(2 * max as usize),
        };
        let len = (end - start).min(unit as u64) as usize;
        let mut cur = vec![0u8; len];
        let mut next: Vec<u8> = Vec::new();
        let mut carry = 0usize; // bytes at the start of `cur` left from the previous round
        let mut pos = start; // file offset just after what `cur` holds
        let mut got = self.read(file, &mut cur[..len], pos)?;
        pos += got as u64;
        let mut want = len;
        loop {
            if self.cancel.load(Relaxed) {
                return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "interrupted"));
            }
            let filled = carry + got;
            let eof = pos >= end || got < want;
            let cuts = self.cuts(&cur[..filled], eof);
            if eof {
                return self.chunk_all(&cur, cuts, out).map(|()| pos);
            }
            let consumed = cuts.last().map(|c| c.end).unwrap_or(0);
            if next.is_empty() {
                next = vec![0u8; len];
            }
            carry = filled - consumed;
            next[..carry].copy_from_slice(&cur[consumed..filled]);
            want = ((end - pos) as usize).min(len - carry);
            let (done, read) = rayon::join(
                || self.chunk_all(&cur, cuts, out),
                || self.read(file, &mut next[carry..carry + want], pos),
            );
            done?;
            got = read?;
            pos += got as u64;
            std::mem::swap(&mut cur, &mut next);
        }
    }

    fn read(&self, file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let got = read_full(file, buf, offset)?;
        self.counts.bytes_read.fetch_add(got as u64, Relaxed);
        self.progress.bytes_read(got as u64);
        Ok(got)
    }

    fn chunk_all(
        &self,
        buf: &[u8],
        cuts: Vec<std::ops::Range<usize>>,
        out: &mut Vec<Extent>,
    ) -> std::io::Result<()> {
        let results: Vec<Result<Extent>> = cuts.into_par_iter().map(|r| self.chunk(&buf[r])).collect();
        for r in results {
            push_extent(out, r.map_err(std::io::Error::other)?);
        }
        Ok(())
    }

    /// Chunk boundaries in `buf`. Unless at EOF, the last (possibly cut-short) chunk is left
    /// for the next round so CDC sees it whole.
    fn cuts(&self, buf: &[u8], eof: bool) -> Vec<std::ops::Range<usize>> {
        let mut cuts: Vec<_> = match self.chunker {
            Chunker::Cdc { min, avg, max } => {
                fastcdc::v2020::FastCDC::new(buf, min as usize, avg as usize, max as usize)
                    .map(|c| c.offset..c.offset + c.length)
                    .collect()
            }
            Chunker::Fixed { size } => {
                (0..buf.len()).step_by(size as usize).map(|s| s..(s + size as usize).min(buf.len())).collect()
            }
            Chunker::Pages { min, avg, max } => page_cuts(buf, min as usize, avg as usize, max as usize),
        };
        if !eof && cuts.len() > 1 {
            cuts.pop();
        }
        cuts
    }

    fn chunk(&self, data: &[u8]) -> Result<Extent> {
        let len = data.len() as u64;
        if self.chunker.is_memory() && is_zero(data) {
            return Ok(Extent { chunk: None, len });
        }
        let id = Id::of(data);
        self.counts.chunks.fetch_add(1, Relaxed);
        if self.known(&id)?.is_none() && self.packer.claim(id) {
            self.counts.new_chunks.fetch_add(1, Relaxed);
            self.counts.new_bytes.fetch_add(len, Relaxed);
            self.packer.add(PackKind::Data, id, data)?;
        }
        Ok(Extent { chunk: Some(id), len })
    }
}

/// Page-aligned content-defined cuts of `buf`, which starts on a page boundary of its file.
///
/// A guest keeps the same pages at many places (page cache and the process that read it, a
/// copied buffer, a forked child), at offsets that agree modulo 4 KiB but rarely modulo a
/// fixed chunk size. Cutting where the content says, and only between pages, lets those
/// copies dedup while every chunk stays whole pages: a run of zero pages is its own range
/// (a hole), and a data chunk ends after a page whose hash hits 1 in `avg / 4096` once the
/// chunk holds `min` bytes, or at `max`. Decisions depend only on the pages since the chunk
/// began, so a cut left over for the next buffer is found again there.
pub(crate) fn page_cuts(buf: &[u8], min: usize, avg: usize, max: usize) -> Vec<std::ops::Range<usize>> {
    let odds = (avg / PAGE).max(1) as u64;
    let mut cuts = Vec::new();
    let mut start = 0;
    let mut zeros = false;
    for (i, page) in buf.chunks(PAGE).enumerate() {
        let at = i * PAGE;
        let zero = is_zero(page);
        if at > start && zero != zeros {
            cuts.push(start..at);
            start = at;
        }
        zeros = zero;
        let end = at + page.len();
        if !zero && (end - start >= max || end - start >= min && page_hash(page) % odds == 0) {
            cuts.push(start..end);
            start = end;
        }
    }
    if start < buf.len() {
        cuts.push(start..buf.len());
    }
    cuts
}

/// A cheap hash of a page for cut decisions: sixteen words spread over it, mixed. It needs to
/// be deterministic and spread, not collision resistant (chunk ids are BLAKE3).
fn page_hash(page: &[u8]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for w in page.chunks(256).map(|c| c.iter().take(8).fold(0u64, |a, &b| a << 8 | b as u64)) {
        h = (h ^ w).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 31;
    }
    h
}

/// Append, merging neighbouring holes.
fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if let (Some(last), None) = (out.last_mut(), e.chunk) {
        if last.chunk.is_none() {
            last.len += e.len;
            return;
        }
    }
    out.push(e);
}

fn is_zero(data: &[u8]) -> bool {
    let (pre, words, post) = unsafe { data.align_to::<u128>() };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

fn read_full(file: &File, buf: &mut [u8], mut offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                offset += k as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The byte ranges of a file that hold data, by SEEK_DATA/SEEK_HOLE.
pub fn data_ranges(file: &File, size: u64) -> std::io::Result<Vec<std::ops::Range<u64>>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(out),          // no data after pos
                Some(libc::EINVAL) => Ok(whole(size)), // filesystem without SEEK_DATA
                _ => Err(err),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (data, hole) = (data as u64, (hole as u64).min(size));
        if hole > data {
            out.push(data..hole);
        }
        pos = hole.max(data + 1);
    }
    Ok(out)
}

pub(super) fn read_xattrs(path: &Path) -> Result<Vec<Xattr>> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut out = Vec::new();
    for name in names {
        match xattr::get(path, &name) {
            Ok(Some(value)) => out.push(Xattr { name: name.as_bytes().to_vec(), value }),
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// An entry opened without following a symlink and checked to be the inode its lstat saw.
///
/// The walk reaches every entry through its directory's descriptor
/// (`/proc/self/fd/<dir>/<name>`), never by resolving the names above it again: whoever
/// owns a pushed tree (a running sandbox) could otherwise swap a directory for a symlink
/// between two steps and have the push read files outside the tree, or swap a file for a
/// FIFO and hang it. What changed between the lstat and the open is skipped as vanished.
pub(super) struct Anchored {
    fd: std::os::fd::OwnedFd,
    at: PathBuf,
}

impl Anchored {
    pub(super) fn open(at: &Path, meta: &Metadata, flags: libc::c_int) -> std::io::Result<Anchored> {
        use std::os::unix::fs::OpenOptionsExt;
        let changed = || std::io::Error::new(std::io::ErrorKind::NotFound, "changed while the push ran");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | flags)
            .open(at)
            .map_err(|e| match e.raw_os_error() {
                // Now a symlink, a socket or a FIFO without a writer.
                Some(libc::ELOOP) | Some(libc::ENXIO) | Some(libc::ENOTDIR) => changed(),
                _ => e,
            })?;
        let now = file.metadata()?;
        if now.dev() != meta.dev() || now.ino() != meta.ino() || now.file_type() != meta.file_type() {
            return Err(changed());
        }
        let fd = std::os::fd::OwnedFd::from(file);
        let at = if proc_fd_works() {
            PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        } else {
            at.to_path_buf()
        };
        Ok(Anchored { fd, at })
    }

    /// Where the entry's children (or the entry itself) are reached.
    pub(super) fn at(&self) -> &Path {
        &self.at
    }
}

/// Without /proc (rare outside a bare chroot) entries are reached by their names.
fn proc_fd_works() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

pub fn new_counts() -> Arc<Counts> {
    Arc::new(Counts::default())
}

/// The data ranges of a file read whole: one range, from 0 to its size.
fn whole(size: u64) -> Vec<std::ops::Range<u64>> {
    std::iter::once(0..size).collect()
}

#[cfg(test)]
mod page_cut_tests {
    use std::collections::HashSet;

    use rand::{Rng, SeedableRng};

    use super::*;

    const MIN: usize = 64 << 10;
    const AVG: usize = 256 << 10;
    const MAX: usize = 1 << 20;

    /// `n` pages: random data, with runs of zero pages where `zero(i)` says.
    fn image(seed: u64, n: usize, zero: impl Fn(usize) -> bool) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut out = vec![0u8; n * PAGE];
        for (i, page) in out.chunks_mut(PAGE).enumerate() {
            if !zero(i) {
                rng.fill(page);
            }
        }
        out
    }

    #[test]
    fn cuts_are_whole_pages_within_bounds_and_zero_runs_stand_alone() {
        let buf = image(1, 3000, |i| (1000..1100).contains(&i) || i % 701 == 0);
        let cuts = page_cuts(&buf, MIN, AVG, MAX);
        assert_eq!(cuts.first().map(|c| c.start), Some(0));
        assert_eq!(cuts.last().map(|c| c.end), Some(buf.len()));
        for (i, c) in cuts.iter().enumerate() {
            assert!(c.start % PAGE == 0 && c.end % PAGE == 0 && c.end > c.start, "{c:?}");
            if i > 0 {
                assert_eq!(cuts[i - 1].end, c.start);
            }
            let zero = is_zero(&buf[c.clone()]);
            let next_zero = cuts.get(i + 1).is_none_or(|n| is_zero(&buf[n.clone()]));
            if zero {
                assert!(cuts.get(i + 1).is_none_or(|n| !is_zero(&buf[n.clone()])), "zero runs are merged");
            } else {
                assert!(c.len() <= MAX, "{c:?}");
                assert!(!buf[c.clone()].chunks(PAGE).any(is_zero), "no zero page inside a data chunk");
                // Short only where a zero run or the end cut it.
                assert!(c.len() >= MIN || next_zero, "{c:?} is short");
            }
        }
        let data: Vec<_> = cuts.iter().filter(|c| !is_zero(&buf[(*c).clone()])).collect();
        let mean = data.iter().map(|c| c.len()).sum::<usize>() / data.len();
        assert!((MIN..=MAX).contains(&mean), "mean data chunk {mean}");
    }

    /// The point of cutting by content: the same pages at another page offset make the same
    /// chunks (after the first cut), where a fixed grid would share none.
    #[test]
    fn the_same_pages_at_another_offset_dedup() {
        let base = image(2, 2048, |_| false);
        let mut shifted = image(3, 3, |_| false);
        shifted.extend_from_slice(&base);
        let chunks = |buf: &[u8], cuts: Vec<std::ops::Range<usize>>| -> HashSet<Id> {
            cuts.into_iter().map(|c| Id::of(&buf[c])).collect()
        };
        let a = chunks(&base, page_cuts(&base, MIN, AVG, MAX));
        let b = chunks(&shifted, page_cuts(&shifted, MIN, AVG, MAX));
        let missing = a.difference(&b).count();
        assert!(a.len() > 10 && missing <= 2, "{missing} of {} chunks not shared", a.len());
        let grid = |buf: &[u8]| -> Vec<std::ops::Range<usize>> {
            (0..buf.len()).step_by(AVG).map(|s| s..(s + AVG).min(buf.len())).collect()
        };
        let fixed = chunks(&base, grid(&base)).intersection(&chunks(&shifted, grid(&shifted))).count();
        assert_eq!(fixed, 0, "a fixed grid shares nothing here");
    }

    /// A buffer boundary does not move cuts: the walker re-scans the last chunk of a buffer
    /// from its start in the next one.
    #[test]
    fn cuts_of_a_prefix_agree_except_the_last() {
        let buf = image(4, 1500, |i| i % 333 < 5);
        let whole = page_cuts(&buf, MIN, AVG, MAX);
        let part = page_cuts(&buf[..900 * PAGE], MIN, AVG, MAX);
        assert_eq!(&whole[..part.len() - 1], &part[..part.len() - 1]);
        let from = part[part.len() - 1].start;
        let rest: Vec<_> = page_cuts(&buf[from..], MIN, AVG, MAX)
            .into_iter()
            .map(|c| c.start + from..c.end + from)
            .collect();
        assert_eq!(&whole[part.len() - 1..], &rest[..]);
    }
}

#[cfg(test)]
mod anchored_tests {
    use super::*;

    fn is_changed(r: std::io::Result<Anchored>) -> bool {
        matches!(r, Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    }

    #[test]
    fn an_entry_swapped_after_its_lstat_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let (d, outside) = (tmp.path().join("d"), tmp.path().join("outside"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let meta = std::fs::symlink_metadata(&d).unwrap();
        std::fs::remove_dir(&d).unwrap();
        std::os::unix::fs::symlink(&outside, &d).unwrap();
        assert!(is_changed(Anchored::open(&d, &meta, libc::O_DIRECTORY)));

        // A file turned FIFO: refused at once, not waited on for a writer.
        let f = tmp.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let meta = std::fs::symlink_metadata(&f).unwrap();
        std::fs::remove_file(&f).unwrap();
        nix::unistd::mkfifo(&f, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(is_changed(Anchored::open(&f, &meta, 0)));
    }

    #[test]
    fn children_are_reached_through_their_directory_not_its_name() {
        let tmp = tempfile::tempdir().unwrap();
        let (d, outside) = (tmp.path().join("d"), tmp.path().join("outside"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(d.join("x"), b"inside").unwrap();
        std::fs::write(outside.join("x"), b"secret").unwrap();
        let dir = Anchored::open(&d, &std::fs::symlink_metadata(&d).unwrap(), libc::O_DIRECTORY).unwrap();
        // The tree's owner swaps the directory for a symlink while the push lists it.
        std::fs::rename(&d, tmp.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, &d).unwrap();
        let x = dir.at().join("x");
        let meta = std::fs::symlink_metadata(&x).unwrap();
        let file = File::from(Anchored::open(&x, &meta, 0).unwrap().fd);
        let mut got = String::new();
        std::io::Read::read_to_string(&mut &file, &mut got).unwrap();
        assert_eq!(got, "inside");
    }
}

#[cfg(test)]
mod walker_tests {
    use super::*;
    use crate::format::config::Chunking;

    /// What a [`Walker`] borrows, for tests that walk without a repository.
    struct Parts {
        cache: LocalCache,
        packer: Packer<'static>,
        condemned: std::collections::HashSet<PackId>,
        cancel: AtomicBool,
    }

    impl Parts {
        fn new(dir: &Path) -> Parts {
            let (tx, mut rx) = super::super::packer::channel();
            std::thread::spawn(move || while rx.blocking_recv().is_some() {});
            Parts {
                cache: LocalCache::open(&dir.join("cache"), "test").unwrap(),
                packer: Packer::new(64 << 20, 3, Default::default(), tx),
                condemned: Default::default(),
                cancel: AtomicBool::new(false),
            }
        }

        fn walker(&self) -> Walker<'_> {
            Walker {
                cache: &self.cache,
                packer: &self.packer,
                chunker: Chunker::fs(&Chunking::default()),
                use_file_cache: false,
                started_ns: 0,
                counts: Default::default(),
                meta_packs: Default::default(),
                condemned: &self.condemned,
                cancel: &self.cancel,
                progress: &super::super::NoProgress,
                overlay: None,
            }
        }
    }

    /// A file replaced by a rename between its lstat and its open (an editor's save) is
    /// taken again, not dropped from the snapshot.
    #[test]
    fn a_file_renamed_over_during_the_push_is_taken_again() {
        let tmp = tempfile::tempdir().unwrap();
        let parts = Parts::new(tmp.path());
        let walker = parts.walker();
        let f = tmp.path().join("f");
        std::fs::write(&f, b"old").unwrap();
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let node = walker
            .settled(&f, &f, |meta| {
                if tries.fetch_add(1, Relaxed) == 0 {
                    std::fs::write(tmp.path().join("f.new"), b"saved again").unwrap();
                    std::fs::rename(tmp.path().join("f.new"), &f).unwrap();
                }
                walker.node(&f, &f, b"f".to_vec(), meta).map(Some)
            })
            .unwrap()
            .expect("the file was dropped");
        assert_eq!(tries.load(Relaxed), 2);
        assert!(matches!(node.kind, NodeKind::File { size: 11, .. }), "{node:?}");
    }

    /// A file truncated between its lstat and its read: what vanished is stored as a hole,
    /// so the extents still cover the size the node records and any data planned after it
    /// stays at its own offset.
    #[test]
    fn a_file_truncated_while_read_keeps_its_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let parts = Parts::new(tmp.path());
        let walker = parts.walker();
        let path = tmp.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mib = 1u64 << 20;
        file.write_all_at(&vec![1u8; 2 * mib as usize], 0).unwrap();
        let meta = file.metadata().unwrap();
        file.set_len(mib / 2).unwrap();
        let extents = walker.chunk_file(&file, &meta, &path).unwrap();
        assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), 2 * mib, "{extents:?}");
        let data: u64 = extents.iter().filter(|e| e.chunk.is_some()).map(|e| e.len).sum();
        assert_eq!(data, mib / 2);
    }
}
