//! [`SnapshotFs`]: the `fuser` filesystem of one snapshot, read-only and lazy.
//!
//! Inode numbers are handed out on first lookup (hard links of one group share one) and taken
//! back when the kernel forgets them, so the table holds what the kernel holds, not the
//! snapshot. Every request that may touch the bucket is answered from a tokio task; the FUSE
//! threads only dispatch. Content never changes, so attributes, entries and page cache are
//! kept by the kernel for a long time.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::num::NonZeroUsize;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_store::format::tree::{self, Content, Extent, Node, NodeKind, Tree};
use cairn_store::{Id, Snapshot};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use crate::fetch::Fetcher;
use crate::prime::Primer;
use crate::stats::MountStats;

/// The snapshot never changes: let the kernel keep what it learned.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// Read-ahead within a file: the first read of a run fetches this far ahead...
const MIN_AHEAD: u64 = 1 << 20;
/// ...and each sequential read doubles the window up to this.
const MAX_AHEAD: u64 = 4 << 20;
/// The kernel's read-ahead window asked for (and the largest read it then sends).
pub(crate) const READ_AHEAD: u32 = 1 << 20;
/// Entries taken per readdir round: more than a reply holds (a page of about 25 entries with
/// attributes, or up to a few hundred names), not so many that a big directory is copied
/// over and over.
const READDIR_BATCH: usize = 256;
/// Decoded directory pages kept in memory.
const TREE_CACHE: usize = 4096;

/// A file's extents with their start offsets: maps an offset to its chunk by binary search.
pub struct FileMap {
    starts: Vec<u64>,
    extents: Vec<Extent>,
    size: u64,
}

impl FileMap {
    fn new(extents: Vec<Extent>) -> FileMap {
        let mut starts = Vec::with_capacity(extents.len());
        let mut at = 0;
        for e in &extents {
            starts.push(at);
            at += e.len;
        }
        FileMap { starts, extents, size: at }
    }

    fn index_of(&self, offset: u64) -> usize {
        self.starts.partition_point(|s| *s <= offset).saturating_sub(1)
    }

    /// Chunk ids covering `[from, to)`.
    fn chunks_in(&self, from: u64, to: u64) -> Vec<Id> {
        if from >= to || from >= self.size {
            return Vec::new();
        }
        let (a, b) = (self.index_of(from), self.index_of(to.min(self.size) - 1));
        self.extents[a..=b].iter().filter_map(|e| e.chunk).collect()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Child(u64, u64),
    Link(u64),
}

struct Inode {
    node: Arc<Node>,
    parent: u64,
    lookups: u64,
    key: Option<(Key, Vec<u8>)>,
    file: Option<Arc<FileMap>>,
    /// Read state shared by all readers of the inode when the kernel sends no `open`.
    handle: Option<Arc<Handle>>,
}

#[derive(Default)]
struct Inodes {
    map: HashMap<u64, Inode>,
    /// (parent, hash of name) or link group → inode; the name is checked on the entry.
    keys: HashMap<Key, Vec<u64>>,
}

struct ReadAhead {
    next: u64,
    window: u64,
    until: u64,
}

struct Handle {
    file: Arc<FileMap>,
    ahead: Mutex<ReadAhead>,
}

pub(crate) struct Inner {
    pub fetcher: Arc<Fetcher>,
    pub stats: Arc<MountStats>,
    rt: tokio::runtime::Handle,
    root: Arc<Node>,
    /// A memory snapshot's root is a file; the mount shows it inside a synthetic directory.
    synthetic_root: Option<Arc<Vec<Node>>>,
    inodes: Mutex<Inodes>,
    next_ino: AtomicU64,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    /// The kernel agreed to send no open/release (and opendir/releasedir): one round trip
    /// per file instead of four.
    no_open: std::sync::atomic::AtomicBool,
    next_fh: AtomicU64,
    trees: Mutex<lru::LruCache<Id, Arc<Tree>>>,
    pub primer: Primer,
    total_bytes: u64,
    total_files: u64,
}

enum Dir {
    Tree(Id),
    Synthetic(Arc<Vec<Node>>),
}

fn eio(what: &str, e: impl std::fmt::Display) -> Errno {
    tracing::warn!("{what}: {e}");
    Errno::EIO
}

impl Inner {
    pub fn new(
        fetcher: Arc<Fetcher>,
        stats: Arc<MountStats>,
        rt: tokio::runtime::Handle,
        snap: &Snapshot,
        prime_max_file: u64,
    ) -> Inner {
        let (root, synthetic_root) = if snap.root.is_dir() {
            (Arc::new(snap.root.clone()), None)
        } else {
            let dir = Node {
                name: Vec::new(),
                kind: NodeKind::Dir { tree: Id([0; 32]) },
                mode: 0o755,
                uid: snap.root.uid,
                gid: snap.root.gid,
                mtime_ns: snap.root.mtime_ns,
                xattrs: Vec::new(),
                link_group: None,
            };
            (Arc::new(dir), Some(Arc::new(vec![snap.root.clone()])))
        };
        let mut inodes = Inodes::default();
        inodes.map.insert(
            1,
            Inode { node: root.clone(), parent: 1, lookups: 1, key: None, file: None, handle: None },
        );
        Inner {
            fetcher,
            stats,
            rt,
            root,
            synthetic_root,
            inodes: Mutex::new(inodes),
            next_ino: AtomicU64::new(2),
            handles: Mutex::new(HashMap::new()),
            no_open: std::sync::atomic::AtomicBool::new(false),
            next_fh: AtomicU64::new(1),
            trees: Mutex::new(lru::LruCache::new(NonZeroUsize::new(TREE_CACHE).expect("nonzero"))),
            primer: Primer::new(prime_max_file),
            total_bytes: snap.stats.bytes,
            total_files: snap.stats.files + snap.stats.dirs + snap.stats.others,
        }
    }

    pub fn root_tree(&self) -> Option<Id> {
        match (&self.root.kind, &self.synthetic_root) {
            (NodeKind::Dir { tree }, None) => Some(*tree),
            _ => None,
        }
    }

    fn node(&self, ino: u64) -> Option<(Arc<Node>, u64)> {
        let inodes = self.inodes.lock().expect("inode lock");
        inodes.map.get(&ino).map(|i| (i.node.clone(), i.parent))
    }

    fn dir_of(&self, ino: u64) -> Result<Dir, Errno> {
        if ino == 1 {
            if let Some(nodes) = &self.synthetic_root {
                return Ok(Dir::Synthetic(nodes.clone()));
            }
        }
        let (node, _) = self.node(ino).ok_or(Errno::ENOENT)?;
        match node.kind {
            NodeKind::Dir { tree } => Ok(Dir::Tree(tree)),
            _ => Err(Errno::ENOTDIR),
        }
    }

    async fn tree(&self, id: Id) -> Result<Arc<Tree>, Errno> {
        if let Some(t) = self.trees.lock().expect("tree lock").get(&id) {
            return Ok(t.clone());
        }
        let bytes = self.fetcher.chunk(id).await.map_err(|e| eio("reading a directory", e))?;
        let t = Arc::new(
            Tree::decode(&bytes, &format!("tree {id}")).map_err(|e| eio("decoding a directory", e))?,
        );
        self.trees.lock().expect("tree lock").put(id, t.clone());
        Ok(t)
    }

    async fn leaf(&self, id: Id) -> Result<Arc<Tree>, Errno> {
        let t = self.tree(id).await?;
        match *t {
            Tree::Leaf(_) => Ok(t),
            Tree::Pages(_) => Err(eio("reading a directory", format!("tree {id}: nested pages"))),
        }
    }

    /// A lookup answered from decoded directories in memory; `None` when a fetch is needed.
    fn lookup_cached(&self, dir: &Dir, name: &[u8]) -> Option<Option<Node>> {
        let find = |nodes: &[Node]| {
            nodes.binary_search_by(|n| n.name.as_slice().cmp(name)).ok().map(|i| nodes[i].clone())
        };
        let id = match dir {
            Dir::Synthetic(nodes) => return Some(find(nodes)),
            Dir::Tree(id) => *id,
        };
        let mut trees = self.trees.lock().expect("tree lock");
        let t = trees.get(&id)?.clone();
        match &*t {
            Tree::Leaf(nodes) => Some(find(nodes)),
            Tree::Pages(pages) => {
                let i = match pages.binary_search_by(|p| p.first.as_slice().cmp(name)) {
                    Ok(i) => i,
                    Err(0) => return Some(None),
                    Err(i) => i - 1,
                };
                match &**trees.get(&pages[i].id)? {
                    Tree::Leaf(nodes) => Some(find(nodes)),
                    Tree::Pages(_) => None,
                }
            }
        }
    }

    /// A file's map when it needs no fetch (inline extents, or built before).
    fn file_map_now(&self, ino: u64) -> Option<Arc<FileMap>> {
        let mut inodes = self.inodes.lock().expect("inode lock");
        let i = inodes.map.get_mut(&ino)?;
        if let Some(f) = &i.file {
            return Some(f.clone());
        }
        let NodeKind::File { size, content: Content::Extents(extents) } = &i.node.kind else { return None };
        let map = Arc::new(FileMap::new(extents.clone()));
        if map.size != *size {
            return None; // the async path reports it
        }
        i.file = Some(map.clone());
        Some(map)
    }

    async fn lookup_in(&self, dir: &Dir, name: &[u8]) -> Result<Option<Node>, Errno> {
        let find = |nodes: &[Node]| {
            nodes.binary_search_by(|n| n.name.as_slice().cmp(name)).ok().map(|i| nodes[i].clone())
        };
        match dir {
            Dir::Synthetic(nodes) => Ok(find(nodes)),
            Dir::Tree(id) => {
                let t = self.tree(*id).await?;
                match &*t {
                    Tree::Leaf(nodes) => Ok(find(nodes)),
                    Tree::Pages(pages) => {
                        let i = match pages.binary_search_by(|p| p.first.as_slice().cmp(name)) {
                            Ok(i) => i,
                            Err(0) => return Ok(None),
                            Err(i) => i - 1,
                        };
                        let leaf = self.leaf(pages[i].id).await?;
                        let Tree::Leaf(nodes) = &*leaf else { unreachable!("leaf() checked") };
                        Ok(find(nodes))
                    }
                }
            }
        }
    }

    /// Up to `max` entries of a directory starting at entry `from`, decoding only the pages
    /// that hold them.
    async fn entries(&self, dir: &Dir, from: usize, max: usize) -> Result<Vec<Node>, Errno> {
        let id = match dir {
            Dir::Synthetic(nodes) => return Ok(slice(nodes, from, max)),
            Dir::Tree(id) => *id,
        };
        match &*self.tree(id).await? {
            Tree::Leaf(nodes) => Ok(slice(nodes, from, max)),
            Tree::Pages(pages) => {
                let mut out = Vec::new();
                for (page, skip, take) in page_spans(pages, from, max) {
                    let leaf = self.leaf(page).await?;
                    let Tree::Leaf(nodes) = &*leaf else { unreachable!("leaf() checked") };
                    out.extend(slice(nodes, skip, take));
                }
                Ok(out)
            }
        }
    }

    /// [`Inner::entries`] from decoded directories in memory only; `None` when a fetch is needed.
    fn entries_cached(&self, dir: &Dir, from: usize, max: usize) -> Option<Vec<Node>> {
        let id = match dir {
            Dir::Synthetic(nodes) => return Some(slice(nodes, from, max)),
            Dir::Tree(id) => *id,
        };
        let mut trees = self.trees.lock().expect("tree lock");
        let t = trees.get(&id)?.clone();
        match &*t {
            Tree::Leaf(nodes) => Some(slice(nodes, from, max)),
            Tree::Pages(pages) => {
                let mut out = Vec::new();
                for (page, skip, take) in page_spans(pages, from, max) {
                    let Tree::Leaf(nodes) = &**trees.get(&page)? else { return None };
                    out.extend(slice(nodes, skip, take));
                }
                Some(out)
            }
        }
    }

    /// Reply to a readdirplus at `offset` (0 ".", 1 "..", then entry `offset - 2`) with
    /// `nodes`, the entries from there on; then hand the listed files to the primer.
    fn answer_plus(
        &self,
        ino: INodeNo,
        offset: u64,
        nodes: Result<Vec<Node>, Errno>,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (me, parent) = match self.node(ino.0) {
            Some((n, p)) => (n, p),
            None => return reply.error(Errno::ENOENT),
        };
        let mut at = offset;
        if at == 0 {
            // The kernel takes no reference for "." and "..".
            if reply.add(ino, 1, ".", &TTL, &attr(ino.0, &me), Generation(0)) {
                return reply.ok();
            }
            at = 1;
        }
        if at == 1 {
            let pnode = self.node(parent).map(|(n, _)| n).unwrap_or_else(|| me.clone());
            if reply.add(INodeNo(parent), 2, "..", &TTL, &attr(parent, &pnode), Generation(0)) {
                return reply.ok();
            }
            at = 2;
        }
        let nodes = match nodes {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let mut to_prime = Vec::new();
        for (i, n) in nodes.into_iter().enumerate() {
            let name = n.name.clone();
            let a = self.remember(ino.0, n);
            if reply.add(a.ino, at + i as u64 + 1, OsStr::from_bytes(&name), &TTL, &a, Generation(0)) {
                // Not sent, so the kernel holds no reference for it.
                self.forget(a.ino.0, 1);
                break;
            }
            if a.kind == FileType::RegularFile && self.primer.wants(a.size) {
                to_prime.push((a.ino.0, a.size));
            }
        }
        reply.ok();
        self.primer.listed(ino.0, to_prime);
    }

    /// Give the kernel an inode for `node` found in `parent` (one more lookup reference).
    fn remember(&self, parent: u64, node: Node) -> FileAttr {
        let name_hash = hash_name(&node.name);
        let key = match node.link_group {
            Some(g) if !node.is_dir() => Key::Link(g),
            _ => Key::Child(parent, name_hash),
        };
        let mut inodes = self.inodes.lock().expect("inode lock");
        let Inodes { map, keys } = &mut *inodes;
        if let Some(candidates) = keys.get(&key) {
            for ino in candidates {
                if let Some(i) = map.get_mut(ino) {
                    let same =
                        matches!(key, Key::Link(_)) || i.key.as_ref().is_some_and(|(_, n)| n == &node.name);
                    if same {
                        i.lookups += 1;
                        return attr(*ino, &i.node);
                    }
                }
            }
        }
        let ino = self.next_ino.fetch_add(1, Ordering::Relaxed);
        let node = Arc::new(node);
        let a = attr(ino, &node);
        let name = node.name.clone();
        map.insert(ino, Inode { node, parent, lookups: 1, key: Some((key, name)), file: None, handle: None });
        keys.entry(key).or_default().push(ino);
        a
    }

    fn forget(&self, ino: u64, n: u64) {
        if ino == 1 {
            return;
        }
        let mut inodes = self.inodes.lock().expect("inode lock");
        let Inodes { map, keys } = &mut *inodes;
        let Some(i) = map.get_mut(&ino) else { return };
        i.lookups = i.lookups.saturating_sub(n);
        if i.lookups == 0 {
            if let Some(i) = map.remove(&ino) {
                if let Some((key, _)) = i.key {
                    if let Some(v) = keys.get_mut(&key) {
                        v.retain(|x| *x != ino);
                        if v.is_empty() {
                            keys.remove(&key);
                        }
                    }
                }
            }
        }
    }

    /// The shared read state of an inode (no-open mode), once its file map is known.
    fn inode_handle(&self, ino: u64, file: Arc<FileMap>) -> Arc<Handle> {
        let new = || {
            let ahead = Mutex::new(ReadAhead { next: 0, window: MIN_AHEAD / 2, until: 0 });
            Arc::new(Handle { file: file.clone(), ahead })
        };
        let (handle, first_read_in) = {
            let mut inodes = self.inodes.lock().expect("inode lock");
            match inodes.map.get_mut(&ino) {
                Some(Inode { handle: Some(h), .. }) => (h.clone(), None),
                Some(i) => (i.handle.insert(new()).clone(), Some(i.parent)),
                None => (new(), None),
            }
        };
        if let Some(dir) = first_read_in {
            self.primer.reading_in(dir);
        }
        handle
    }

    /// An open (when the kernel sends them): the reader wants data from this directory.
    fn opening(&self, ino: u64) {
        let parent = self.inodes.lock().expect("inode lock").map.get(&ino).map(|i| i.parent);
        if let Some(dir) = parent {
            self.primer.reading_in(dir);
        }
    }

    fn add_handle(&self, file: Arc<FileMap>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let ahead = Mutex::new(ReadAhead { next: 0, window: MIN_AHEAD / 2, until: 0 });
        self.handles.lock().expect("handle lock").insert(fh, Arc::new(Handle { file, ahead }));
        fh
    }

    pub fn inode_count(&self) -> usize {
        self.inodes.lock().expect("inode lock").map.len()
    }

    async fn file_map(&self, ino: u64) -> Result<Arc<FileMap>, Errno> {
        let node = {
            let inodes = self.inodes.lock().expect("inode lock");
            let i = inodes.map.get(&ino).ok_or(Errno::ENOENT)?;
            if let Some(f) = &i.file {
                return Ok(f.clone());
            }
            i.node.clone()
        };
        let NodeKind::File { size, content } = &node.kind else { return Err(Errno::EISDIR) };
        let extents = match content {
            Content::Extents(e) => e.clone(),
            Content::Lists(pages) => {
                let ids: Vec<Id> = pages.iter().map(|p| p.id).collect();
                let lists =
                    self.fetcher.chunks(&ids, &[]).await.map_err(|e| eio("reading a chunk list", e))?;
                let mut out = Vec::new();
                for (page, bytes) in pages.iter().zip(lists) {
                    let object = format!("chunk list {}", page.id);
                    out.extend(tree::decode_list(&bytes, page, &object).map_err(|e| eio("chunk list", e))?);
                }
                out
            }
        };
        let map = Arc::new(FileMap::new(extents));
        if map.size != *size {
            return Err(eio("opening a file", format!("content adds up to {} bytes, not {size}", map.size)));
        }
        if let Some(i) = self.inodes.lock().expect("inode lock").map.get_mut(&ino) {
            i.file = Some(map.clone());
        }
        Ok(map)
    }

    /// What a read needs: its end, its chunks, and the chunks to fetch ahead of it.
    fn plan_read(&self, handle: &Handle, offset: u64, size: u32) -> ReadPlan {
        let file = &handle.file;
        let end = (offset + size as u64).min(file.size);
        if offset >= end {
            return ReadPlan { end: offset, wanted: Vec::new(), ahead: Vec::new() };
        }
        let ahead = {
            let mut ra = handle.ahead.lock().expect("read-ahead lock");
            ra.window =
                if offset == ra.next { (ra.window * 2).clamp(MIN_AHEAD, MAX_AHEAD) } else { MIN_AHEAD };
            ra.next = end;
            if end + ra.window / 2 > ra.until && end < file.size {
                let from = ra.until.max(end);
                ra.until = end + ra.window;
                file.chunks_in(from, ra.until)
            } else {
                Vec::new()
            }
        };
        ReadPlan { end, wanted: file.chunks_in(offset, end), ahead }
    }

    /// Whether a reader has read the file already (its pages are cached by now), or the
    /// kernel has forgotten the inode. (Known only when the kernel sends no opens, which
    /// every kernel this runs on does; otherwise the worker may race a reader, harmlessly.)
    pub fn read_or_gone(&self, ino: u64) -> bool {
        self.inodes.lock().expect("inode lock").map.get(&ino).is_none_or(|i| i.handle.is_some())
    }

    /// A whole file's content if the kernel still knows the inode and every chunk is on this
    /// host (for priming: fetches nothing, records no trace, takes no read-ahead state).
    pub fn local_content(&self, ino: u64) -> Option<Vec<u8>> {
        let file = self.file_map_now(ino)?;
        let plan = ReadPlan { end: file.size, wanted: file.chunks_in(0, file.size), ahead: Vec::new() };
        let chunks = self.fetcher.local_untraced(&plan.wanted)?;
        assemble(&file, 0, &plan, &chunks).ok()
    }

    async fn read(&self, handle: &Handle, offset: u64, plan: ReadPlan) -> Result<Vec<u8>, Errno> {
        let chunks =
            self.fetcher.chunks(&plan.wanted, &plan.ahead).await.map_err(|e| eio("reading file data", e))?;
        assemble(&handle.file, offset, &plan, &chunks)
    }
}

struct ReadPlan {
    end: u64,
    wanted: Vec<Id>,
    ahead: Vec<Id>,
}

/// The bytes `[offset, plan.end)` of a file from its chunks (in `plan.wanted` order) and holes.
fn assemble(
    file: &FileMap,
    offset: u64,
    plan: &ReadPlan,
    chunks: &[crate::fetch::Chunk],
) -> Result<Vec<u8>, Errno> {
    let end = plan.end;
    if offset >= end {
        return Ok(Vec::new());
    }
    let mut by_id: HashMap<Id, &Vec<u8>> = HashMap::with_capacity(chunks.len());
    for (id, c) in plan.wanted.iter().zip(chunks) {
        by_id.insert(*id, c);
    }
    let mut out = Vec::with_capacity((end - offset) as usize);
    let (a, b) = (file.index_of(offset), file.index_of(end - 1));
    for i in a..=b {
        let (start, e) = (file.starts[i], file.extents[i]);
        let lo = (offset.max(start) - start) as usize;
        let hi = (end.min(start + e.len) - start) as usize;
        match e.chunk {
            None => out.resize(out.len() + (hi - lo), 0),
            Some(id) => {
                let c = by_id.get(&id).ok_or_else(|| eio("reading file data", "chunk not delivered"))?;
                if c.len() as u64 != e.len {
                    return Err(eio("reading file data", format!("chunk {id} is not {} bytes long", e.len)));
                }
                out.extend_from_slice(&c[lo..hi]);
            }
        }
    }
    Ok(out)
}

/// `max` nodes from `from` on, cloned.
fn slice(nodes: &[Node], from: usize, max: usize) -> Vec<Node> {
    nodes.iter().skip(from).take(max).cloned().collect()
}

/// The pages of a paged directory holding entries `[from, from + max)`: (page, entries to skip
/// in it, entries to take from it).
fn page_spans(pages: &[tree::TreePage], from: usize, max: usize) -> Vec<(Id, usize, usize)> {
    let (mut first, mut left, mut out) = (0usize, max, Vec::new());
    for p in pages {
        let count = p.count as usize;
        if first + count > from && left > 0 {
            let skip = from.saturating_sub(first);
            let take = (count - skip).min(left);
            out.push((p.id, skip, take));
            left -= take;
        }
        first += count;
    }
    out
}

fn hash_name(name: &[u8]) -> u64 {
    let h = blake3::hash(name);
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

fn time_of(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn file_type(kind: &NodeKind) -> FileType {
    match kind {
        NodeKind::Dir { .. } => FileType::Directory,
        NodeKind::File { .. } => FileType::RegularFile,
        NodeKind::Symlink { .. } => FileType::Symlink,
        NodeKind::CharDevice { .. } => FileType::CharDevice,
        NodeKind::BlockDevice { .. } => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
    }
}

fn attr(ino: u64, node: &Node) -> FileAttr {
    let t = time_of(node.mtime_ns);
    let rdev = match node.kind {
        NodeKind::CharDevice { rdev } | NodeKind::BlockDevice { rdev } => rdev as u32,
        _ => 0,
    };
    // Hard-link counts are not stored; 2 tells tools like tar and rsync -H to look for
    // siblings by inode number, which are shared. Directories report 1 ("unknown"), as btrfs
    // does, so find does not infer subdirectory counts.
    let nlink = if node.link_group.is_some() && !node.is_dir() { 2 } else { 1 };
    FileAttr {
        ino: INodeNo(ino),
        size: node.size(),
        blocks: node.size().div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(&node.kind),
        perm: (node.mode & 0o7777) as u16,
        nlink,
        uid: node.uid,
        gid: node.gid,
        rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// The `fuser` face of a mounted snapshot.
pub struct SnapshotFs {
    pub(crate) inner: Arc<Inner>,
}

impl SnapshotFs {
    fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(&self, f: F) {
        self.inner.rt.spawn(f);
    }
}

impl Filesystem for SnapshotFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Always readdirplus (no _AUTO, which falls back to readdir after a directory's first
        // page): attributes cost nothing extra here, and each entry it carries is a lookup
        // round trip saved and a file the primer can push.
        let wanted =
            InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_PARALLEL_DIROPS | InitFlags::FUSE_CACHE_SYMLINKS;
        for flag in wanted.iter() {
            let _ = config.add_capabilities(flag);
        }
        let no_open = InitFlags::FUSE_NO_OPEN_SUPPORT | InitFlags::FUSE_NO_OPENDIR_SUPPORT;
        if config.add_capabilities(no_open).is_ok() {
            self.inner.no_open.store(true, Ordering::Relaxed);
        }
        let _ = config.set_max_readahead(READ_AHEAD).or_else(|max| config.set_max_readahead(max));
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let inner = self.inner.clone();
        let name = name.as_bytes().to_vec();
        MountStats::bump(&inner.stats.lookups, 1);
        if let Ok(dir) = inner.dir_of(parent.0) {
            match inner.lookup_cached(&dir, &name) {
                Some(Some(node)) => return reply.entry(&TTL, &inner.remember(parent.0, node), Generation(0)),
                Some(None) => return reply.error(Errno::ENOENT),
                None => {}
            }
        }
        self.spawn(async move {
            let found = async {
                let dir = inner.dir_of(parent.0)?;
                inner.lookup_in(&dir, &name).await
            };
            match found.await {
                Ok(Some(node)) => reply.entry(&TTL, &inner.remember(parent.0, node), Generation(0)),
                Ok(None) => reply.error(Errno::ENOENT),
                Err(e) => reply.error(e),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inner.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inner.node(ino.0) {
            Some((node, _)) => reply.attr(&TTL, &attr(ino.0, &node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inner.node(ino.0) {
            Some((node, _)) => match &node.kind {
                NodeKind::Symlink { target } => reply.data(target),
                _ => reply.error(Errno::EINVAL),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.inner.no_open.load(Ordering::Relaxed) {
            // The kernel then keeps the page cache (immutable files) and sends reads with fh 0.
            return reply.error(Errno::ENOSYS);
        }
        self.inner.opening(ino.0);
        if let Some(file) = self.inner.file_map_now(ino.0) {
            return reply.opened(FileHandle(self.inner.add_handle(file)), FopenFlags::FOPEN_KEEP_CACHE);
        }
        let inner = self.inner.clone();
        self.spawn(async move {
            match inner.file_map(ino.0).await {
                Ok(file) => reply.opened(FileHandle(inner.add_handle(file)), FopenFlags::FOPEN_KEEP_CACHE),
                Err(e) => reply.error(e),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let started = Instant::now();
        let handle = if fh.0 == 0 {
            match self.inner.file_map_now(ino.0) {
                Some(file) => self.inner.inode_handle(ino.0, file),
                None => {
                    // A long file whose chunk lists must be fetched first.
                    let inner = self.inner.clone();
                    return self.spawn(async move {
                        let result = match inner.file_map(ino.0).await {
                            Ok(file) => {
                                let handle = inner.inode_handle(ino.0, file);
                                let plan = inner.plan_read(&handle, offset, size);
                                inner.read(&handle, offset, plan).await
                            }
                            Err(e) => Err(e),
                        };
                        let n = result.as_ref().map_or(0, |d| d.len() as u64);
                        inner.stats.record_read(started.elapsed(), n, result.is_ok());
                        match result {
                            Ok(data) => reply.data(&data),
                            Err(e) => reply.error(e),
                        }
                    });
                }
            }
        } else {
            match self.inner.handles.lock().expect("handle lock").get(&fh.0).cloned() {
                Some(h) => h,
                None => return reply.error(Errno::EBADF),
            }
        };
        let plan = self.inner.plan_read(&handle, offset, size);
        // Everything local: answer on this thread, no task hop.
        if let Some(chunks) = self.inner.fetcher.try_local(&plan.wanted) {
            self.inner.fetcher.read_ahead(&self.inner.rt, plan.ahead.clone());
            let r = assemble(&handle.file, offset, &plan, &chunks);
            let ok = r.is_ok();
            let n = r.as_ref().map_or(0, |d| d.len() as u64);
            self.inner.stats.record_read(started.elapsed(), n, ok);
            return match r {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(e),
            };
        }
        let inner = self.inner.clone();
        self.spawn(async move {
            match inner.read(&handle, offset, plan).await {
                Ok(data) => {
                    inner.stats.record_read(started.elapsed(), data.len() as u64, true);
                    reply.data(&data);
                }
                Err(e) => {
                    inner.stats.record_read(started.elapsed(), 0, false);
                    reply.error(e);
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush in a read-only mount; ENOSYS tells the kernel to stop asking.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.inner.handles.lock().expect("handle lock").remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.inner.no_open.load(Ordering::Relaxed) {
            return reply.error(Errno::ENOSYS);
        }
        match self.inner.dir_of(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let inner = self.inner.clone();
        self.spawn(async move {
            let parent = inner.node(ino.0).map(|(_, p)| p).unwrap_or(1);
            let mut at = offset;
            if at == 0 {
                let _ = reply.add(ino, 1, FileType::Directory, ".");
                at = 1;
            }
            if at == 1 {
                let _ = reply.add(INodeNo(parent), 2, FileType::Directory, "..");
                at = 2;
            }
            let nodes = match inner.dir_of(ino.0) {
                Ok(dir) => inner.entries(&dir, (at - 2) as usize, READDIR_BATCH).await,
                Err(e) => Err(e),
            };
            match nodes {
                Ok(nodes) => {
                    for (i, n) in nodes.iter().enumerate() {
                        // Plain readdir hands out no references, so no inode is taken here.
                        let fake_ino = u64::MAX - hash_name(&n.name) % (1 << 40);
                        if reply.add(
                            INodeNo(fake_ino),
                            at + i as u64 + 1,
                            file_type(&n.kind),
                            OsStr::from_bytes(&n.name),
                        ) {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let from = offset.saturating_sub(2) as usize;
        // A directory already decoded is answered on this thread: a reader walking a tree
        // waits on one listing per directory, and a task hop is a context switch more.
        if let Ok(dir) = self.inner.dir_of(ino.0) {
            if let Some(nodes) = self.inner.entries_cached(&dir, from, READDIR_BATCH) {
                return self.inner.answer_plus(ino, offset, Ok(nodes), reply);
            }
        }
        let inner = self.inner.clone();
        self.spawn(async move {
            let nodes = match inner.dir_of(ino.0) {
                Ok(dir) => inner.entries(&dir, from, READDIR_BATCH).await,
                Err(e) => Err(e),
            };
            inner.answer_plus(ino, offset, nodes, reply);
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.inner.total_bytes.div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.inner.total_files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some((node, _)) = self.inner.node(ino.0) else { return reply.error(Errno::ENOENT) };
        match node.xattrs.iter().find(|x| x.name == name.as_bytes()) {
            None => reply.error(Errno::NO_XATTR),
            Some(x) if size == 0 => reply.size(x.value.len() as u32),
            Some(x) if x.value.len() > size as usize => reply.error(Errno::ERANGE),
            Some(x) => reply.data(&x.value),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some((node, _)) = self.inner.node(ino.0) else { return reply.error(Errno::ENOENT) };
        let mut list = Vec::new();
        for x in &node.xattrs {
            list.extend_from_slice(&x.name);
            list.push(0);
        }
        if size == 0 {
            reply.size(list.len() as u32)
        } else if list.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&list)
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}
