//! `push`: one source (a directory tree or a memory image) into one new snapshot.
//!
//! Pipeline: rayon threads walk, read, chunk, hash and compress; new chunks fill packs;
//! a tokio task uploads packs while the walk goes on. Then, in this order — the commit
//! protocol of `docs/format.md` — the index segment, then the snapshot root.

pub mod overlay;
mod packer;
pub mod source;

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::backend::RequestStats;
use crate::error::{Error, Result};
use crate::format::snapshot::{self, Kind, Snapshot, SnapshotStats};
use crate::id::Id;
use crate::lease::WriterLease;
use crate::repo::Repository;
use source::{Chunker, Walker};

/// Which snapshot a push builds on: its lineage, and whether unchanged files may be skipped.
#[derive(Clone, Debug, Default)]
pub enum ParentSpec {
    /// The latest snapshot of the same host, source and kind, if any.
    #[default]
    Auto,
    None,
    Id(String),
}

#[derive(Clone, Debug)]
pub struct PushOptions {
    pub source: PathBuf,
    pub kind: Kind,
    pub tags: BTreeMap<String, String>,
    pub parent: ParentSpec,
    pub expire_in: Option<Duration>,
    /// Defaults to the machine's host name.
    pub host: Option<String>,
    /// Recorded as the snapshot's `source` instead of the pushed path (volumes: `volume:NAME`).
    pub label: Option<String>,
    /// Overlay commit: `source` is the upper directory of an overlayfs mount over this snapshot.
    pub overlay: Option<overlay::OverlayBase>,
}

impl PushOptions {
    /// A push of `source` as `kind` with every other option at its default.
    pub fn new(source: impl Into<PathBuf>, kind: Kind) -> PushOptions {
        PushOptions {
            source: source.into(),
            kind,
            tags: BTreeMap::new(),
            parent: ParentSpec::Auto,
            expire_in: None,
            host: None,
            label: None,
            overlay: None,
        }
    }
}

/// Callbacks for progress display; all no-ops by default. Called from many threads.
pub trait PushProgress: Sync {
    fn bytes_read(&self, _n: u64) {}
    fn file_done(&self, _size: u64) {}
}

pub struct NoProgress;
impl PushProgress for NoProgress {}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PushSummary {
    pub snapshot: Id,
    pub parent: Option<Id>,
    pub stats: SnapshotStats,
    pub files_unchanged: u64,
    pub packs: usize,
    pub requests: RequestStats,
    pub seconds: f64,
}

impl PushSummary {
    /// Logical bytes per stored byte; how much deduplication and compression saved.
    pub fn dedup_ratio(&self) -> f64 {
        self.stats.bytes as f64 / self.stats.stored_bytes.max(1) as f64
    }
}

pub fn host_name() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown".into())
}

pub async fn push(
    repo: &Repository,
    opts: &PushOptions,
    progress: &dyn PushProgress,
    cancel: &AtomicBool,
) -> Result<PushSummary> {
    let started = Instant::now();
    let requests_before = repo.requests();
    let source = std::fs::canonicalize(&opts.source).map_err(|e| Error::io(&opts.source, e))?;
    let host = opts.host.clone().unwrap_or_else(host_name);
    let source_str = opts.label.clone().unwrap_or_else(|| source.to_string_lossy().into_owned());
    let parent = match &opts.parent {
        ParentSpec::None => None,
        ParentSpec::Id(spec) => Some(repo.resolve_snapshot(spec).await?.0),
        ParentSpec::Auto => repo
            .snapshots()
            .await?
            .into_iter()
            .rev()
            .find(|(_, s)| s.host == host && s.source == source_str && s.kind == opts.kind)
            .map(|(id, _)| id),
    };
    // GC protocol (docs/gc.md): lease first, then the GC state, then the index.
    let lease = std::sync::Arc::new(WriterLease::acquire(repo.store().clone(), &host).await?);
    let beating = lease.clone();
    let heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(crate::lease::HEARTBEAT).await;
            if beating.heartbeat().await.is_err() {
                return; // revoked: the commit will fail and say so
            }
        }
    });
    let result = async {
        if let Some(base) = &opts.overlay {
            overlay::check_base_alive(repo, &base.snapshot).await?;
        }
        repo.sync_index().await?;
        push_under_lease(
            repo,
            opts,
            progress,
            cancel,
            &lease,
            PushContext { started, requests_before, source, host, source_str, parent },
        )
        .await
    }
    .await;
    heartbeat.abort();
    if result.is_err() {
        let _ = lease.release().await;
    }
    result
}

struct PushContext {
    started: Instant,
    /// The handle may be shared (a mount daemon commits): count only this push's requests.
    requests_before: RequestStats,
    source: PathBuf,
    host: String,
    source_str: String,
    parent: Option<Id>,
}

async fn push_under_lease(
    repo: &Repository,
    opts: &PushOptions,
    progress: &dyn PushProgress,
    cancel: &AtomicBool,
    lease: &WriterLease,
    ctx: PushContext,
) -> Result<PushSummary> {
    let PushContext { started, requests_before, source, host, source_str, parent } = ctx;
    let chunking = repo.config().chunking;
    let chunker = match opts.kind {
        Kind::Fs => Chunker::fs(&chunking),
        Kind::Memory => Chunker::memory(&chunking),
    };
    let name = source.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_else(|| b"root".to_vec());
    let (tx, rx) = packer::channel();
    let uploaded = packer::Uploaded::default();
    let uploads = tokio::spawn(packer::upload_all(repo.store().clone(), rx, uploaded.clone()));
    let config = repo.config();
    let packer =
        packer::Packer::new(config.pack_size as usize, config.zstd_level, lease.condemned().clone(), tx)
            .indexing(repo, lease, uploaded.clone());
    let started_ns =
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
    let walker = Walker {
        cache: repo.cache()?,
        packer: &packer,
        chunker,
        use_file_cache: parent.is_some(),
        started_ns,
        counts: Default::default(),
        meta_packs: Mutex::default(),
        condemned: lease.condemned(),
        cancel,
        progress,
        overlay: opts.overlay.as_ref().map(|base| overlay::Overlay {
            repo,
            handle: tokio::runtime::Handle::current(),
            root: base.root.clone(),
        }),
    };
    // The walk blocks (file reads, a full upload queue); keep it off the async workers.
    let walked = tokio::task::block_in_place(|| {
        let root = match (opts.kind, &walker.overlay) {
            (Kind::Fs, Some(ov)) => walker.overlay_root(&source, ov),
            (Kind::Fs, None) => walker.dir(&source, name),
            (Kind::Memory, _) => walker.file(&source, name),
        }?;
        packer.flush()?;
        Ok::<_, Error>(root)
    });
    let Walker { counts: c, meta_packs, .. } = walker;
    let mut indexed = packer.into_indexed(); // also closes the upload queue
    let finished = uploads.await.map_err(|e| Error::Usage(format!("upload task: {e}")))?;
    // An upload failure (a full disk, a bucket error) stops the walk with "pack upload
    // stopped"; report the cause, not that symptom.
    finished?;
    let root = walked?;

    // Commit, in order: index segments (packs are all stored), then the snapshot root.
    let rest = std::mem::take(&mut *uploaded.lock().expect("uploaded lock"));
    indexed.add(packer::index_packs(repo, lease, rest).await?);
    let mut meta_packs = meta_packs.into_inner().expect("meta lock");
    meta_packs.extend(indexed.meta_packs);
    let stored_bytes = indexed.stored_bytes;
    let stats = SnapshotStats {
        files: c.files.load(Relaxed),
        dirs: c.dirs.load(Relaxed),
        others: c.others.load(Relaxed),
        bytes: c.bytes.load(Relaxed),
        bytes_read: c.bytes_read.load(Relaxed),
        chunks: c.chunks.load(Relaxed),
        new_chunks: c.new_chunks.load(Relaxed),
        new_bytes: c.new_bytes.load(Relaxed),
        stored_bytes,
    };
    let now = SystemTime::now();
    let mut meta_packs: Vec<_> = meta_packs.into_iter().collect();
    meta_packs.sort();
    let snap = Snapshot {
        format: 1,
        time: humantime::format_rfc3339_nanos(now).to_string(),
        host,
        source: source_str,
        kind: opts.kind,
        tags: opts.tags.clone(),
        parent,
        expires: opts.expire_in.map(|d| humantime::format_rfc3339_seconds(now + d).to_string()),
        root,
        meta_packs,
        stats: stats.clone(),
    };
    let (id, bytes) = snap.encode();
    // The commit point is the lease; the copy under snapshots/ is what readers list.
    lease.commit(id, &bytes).await?;
    if let Some(base) = &opts.overlay {
        // Again after the commit point (see `overlay::check_base_alive`); failing here drops
        // the committed lease (the caller releases it) before the root is published.
        overlay::check_base_alive(repo, &base.snapshot).await?;
    }
    repo.put(&snapshot::object_name(&id), bytes).await?;
    lease.release().await?;
    Ok(PushSummary {
        snapshot: id,
        parent,
        stats,
        files_unchanged: c.files_unchanged.load(Relaxed),
        packs: indexed.packs,
        requests: repo.requests().since(&requests_before),
        seconds: started.elapsed().as_secs_f64(),
    })
}
