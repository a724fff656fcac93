//! [`mount`]: put a snapshot on a mountpoint and keep it served until it is unmounted.
//!
//! Before the kernel sees the mount, only the snapshot root and its root directory are read:
//! mount time does not depend on snapshot size. Afterwards, in the background and below
//! on-demand reads in priority, the snapshot's metadata packs and (if one was recorded) its
//! access trace are fetched into the host cache within a bandwidth budget, if this process
//! owns that cache (another would only drop what it fetched).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_store::format::trace::{self, Trace};
use cairn_store::{ChunkId, Id, Repository, Snapshot};
use fuser::{MountOption, SessionACL, SessionUnmounter};

use crate::cache::{CacheError, ChunkCache};
use crate::fetch::Fetcher;
use crate::fs::{Inner, SnapshotFs, READ_AHEAD};
use crate::stats::{MountStats, StatsReport};

#[derive(thiserror::Error, Debug)]
pub enum MountError {
    #[error(transparent)]
    Store(#[from] cairn_store::Error),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("mounting on {path}: {source}")]
    Mount { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the root directory of snapshot {0} cannot be read: {1}")]
    Root(Id, String),
    #[error("unmounting {path}: {message}")]
    Unmount { path: PathBuf, message: String },
}

/// Where a mount takes its prefetch list from.
#[derive(Clone, Debug, Default)]
pub enum PrefetchTrace {
    /// The trace stored with the snapshot (`traces/<id>`), if there is one.
    #[default]
    Stored,
    File(PathBuf),
    Off,
}

#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Let users other than the mounting one in (runtimes mount as root for sandbox users).
    pub allow_other: bool,
    /// Honour device nodes (`dev`); off by default, as for any FUSE mount.
    pub dev: bool,
    /// Honour setuid/setgid bits (`suid`); off by default.
    pub suid: bool,
    /// FUSE dispatch threads; the work itself runs on the tokio runtime.
    pub threads: usize,
    /// Decoded chunks kept in this process's memory, above the host cache.
    pub memory_cache_bytes: u64,
    /// Write the chunks this mount touched, in order, to this file at unmount.
    pub record_trace: Option<PathBuf>,
    /// Store that trace with the snapshot at unmount, for later mounts to prefetch.
    pub store_trace: bool,
    pub prefetch: PrefetchTrace,
    /// Fetch the snapshot's metadata packs in the background after mounting.
    pub prefetch_metadata: bool,
    /// Bandwidth budget of background prefetch, bytes per second.
    pub prefetch_rate: u64,
    /// Refresh this JSON file with the mount's counters every second.
    pub stats_file: Option<PathBuf>,
    /// After a listing, push files up to this size into the page cache when their chunks are
    /// already on this host (0: never). See [`crate::prime`].
    pub prime_max_file: u64,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: false,
            dev: false,
            suid: false,
            threads: 4,
            memory_cache_bytes: 128 << 20,
            record_trace: None,
            store_trace: false,
            prefetch: PrefetchTrace::Stored,
            prefetch_metadata: true,
            prefetch_rate: 200 << 20,
            stats_file: None,
            prime_max_file: 1 << 20,
        }
    }
}

/// A snapshot being served on a mountpoint.
pub struct MountedSnapshot {
    inner: Arc<Inner>,
    unmounter: Mutex<SessionUnmounter>,
    session: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    mountpoint: PathBuf,
    snapshot: Id,
    started: Instant,
    opts: MountOptions,
    stop: Arc<AtomicBool>,
}

/// Mount snapshot `id` (already resolved and loaded) read-only on `mountpoint`.
pub async fn mount(
    repo: Arc<Repository>,
    cache: Arc<ChunkCache>,
    id: Id,
    snapshot: &Snapshot,
    mountpoint: &Path,
    opts: MountOptions,
) -> Result<MountedSnapshot, MountError> {
    let stats = Arc::new(MountStats::default());
    let record = opts.record_trace.is_some() || opts.store_trace;
    let fetcher = Arc::new(Fetcher::new(repo, cache, stats.clone(), opts.memory_cache_bytes, record));
    let inner = Arc::new(Inner::new(
        fetcher.clone(),
        stats,
        tokio::runtime::Handle::current(),
        snapshot,
        opts.prime_max_file,
    ));
    if let Some(tree) = inner.root_tree() {
        fetcher.chunk(tree).await.map_err(|e| MountError::Root(id, e.to_string()))?;
    }
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("cairn:{}", id.short())),
        MountOption::Subtype("cairn".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        if opts.dev { MountOption::Dev } else { MountOption::NoDev },
        if opts.suid { MountOption::Suid } else { MountOption::NoSuid },
    ];
    config.acl = if opts.allow_other { SessionACL::All } else { SessionACL::Owner };
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let fs = SnapshotFs { inner: inner.clone() };
    // Canonical before mounting: afterwards, stat-ing the path would wait on this daemon.
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let path = mountpoint.to_path_buf();
    let mut session = tokio::task::spawn_blocking(move || fuser::Session::new(fs, &path, &config))
        .await
        .map_err(|e| MountError::Mount { path: mountpoint.into(), source: std::io::Error::other(e) })?
        .map_err(|e| MountError::Mount { path: mountpoint.into(), source: e })?;
    raise_read_ahead(&canonical);
    let unmounter = session.unmount_callable();
    let notifier = session.notifier();
    let thread = std::thread::Builder::new()
        .name("cairn-fuse".into())
        .spawn(move || session.run())
        .map_err(|e| MountError::Mount { path: mountpoint.into(), source: e })?;
    if let Err(e) = inner.primer.start(Arc::downgrade(&inner), notifier) {
        tracing::warn!("no page-cache priming on {}: {e}", mountpoint.display());
    }
    let mounted = MountedSnapshot {
        inner,
        unmounter: Mutex::new(unmounter),
        session: Some(thread),
        mountpoint: mountpoint.into(),
        snapshot: id,
        started: Instant::now(),
        opts,
        stop: Arc::new(AtomicBool::new(false)),
    };
    mounted.start_prefetch(snapshot.meta_packs.clone());
    mounted.start_stats_file();
    Ok(mounted)
}

/// FUSE mounts start with the kernel's default read-ahead of 128 KiB (INIT cannot offer more:
/// the kernel's own offer caps it), so a large file arrives in 128 KiB reads, one round trip
/// each. Raising the mount's window to 1 MiB cuts those round trips by eight (reads that large
/// are allowed: fuser's max_write of 16 MiB sets the request page limit). This must follow
/// INIT, or INIT would clamp
/// the window back: fuser 0.18 completes INIT inside `Session::new`. Needs root; a mount
/// without it keeps the default.
fn raise_read_ahead(mountpoint: &Path) {
    let Some(m) = crate::mountinfo::mount_at_canonical(mountpoint) else { return };
    let knob = format!("/sys/class/bdi/{}/read_ahead_kb", m.device);
    if let Err(e) = std::fs::write(&knob, (READ_AHEAD >> 10).to_string()) {
        tracing::debug!("read-ahead of {} stays at the default: {knob}: {e}", mountpoint.display());
    }
}

impl MountedSnapshot {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn stats(&self) -> StatsReport {
        let f = &self.inner.fetcher;
        self.inner.stats.report(
            self.snapshot.to_hex(),
            self.mountpoint.display().to_string(),
            self.started.elapsed(),
            f.repo().requests(),
            f.cache().stats(),
        )
    }

    /// Inodes the kernel currently holds references to (for memory tests).
    pub fn inodes(&self) -> usize {
        self.inner.inode_count()
    }

    /// Whether the session has ended (unmounted here or from outside).
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Ask the kernel to unmount; [`MountedSnapshot::finish`] then returns.
    pub fn unmount(&self) -> Result<(), MountError> {
        self.unmounter
            .lock()
            .expect("unmounter lock")
            .unmount()
            .map_err(|e| MountError::Unmount { path: self.mountpoint.clone(), message: e.to_string() })
    }

    /// Wait for the session to end, then save the trace and the final counters.
    pub async fn finish(mut self) -> Result<StatsReport, MountError> {
        if let Some(thread) = self.session.take() {
            let ended = tokio::task::spawn_blocking(move || thread.join()).await;
            if let Ok(Ok(Err(e))) = ended {
                tracing::warn!("FUSE session ended with: {e}");
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || inner.primer.stop()).await;
        if let Some(order) = self.inner.fetcher.take_trace() {
            let bytes = Trace { chunks: order }.encode();
            if let Some(path) = &self.opts.record_trace {
                write_atomic(path, &bytes).map_err(|e| MountError::Io { path: path.clone(), source: e })?;
            }
            if self.opts.store_trace {
                self.inner.fetcher.repo().put(&trace::object_name(&self.snapshot), bytes).await?;
            }
        }
        let report = self.stats();
        if let Some(path) = &self.opts.stats_file {
            write_stats(path, &report);
        }
        Ok(report)
    }

    fn start_stats_file(&self) {
        let Some(path) = self.opts.stats_file.clone() else { return };
        let stop = self.stop.clone();
        let inner = self.inner.clone();
        let (snapshot, mountpoint, started) =
            (self.snapshot.to_hex(), self.mountpoint.display().to_string(), self.started);
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let f = &inner.fetcher;
                let report = inner.stats.report(
                    snapshot.clone(),
                    mountpoint.clone(),
                    started.elapsed(),
                    f.repo().requests(),
                    f.cache().stats(),
                );
                write_stats(&path, &report);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    fn start_prefetch(&self, meta_packs: Vec<Id>) {
        let fetcher = self.inner.fetcher.clone();
        let stop = self.stop.clone();
        let opts = self.opts.clone();
        let snapshot = self.snapshot;
        tokio::spawn(async move {
            let started = Instant::now();
            let mut budget = Budget { rate: opts.prefetch_rate.max(1), started, spent: 0 };
            if opts.prefetch_metadata && fetcher.cache().is_owner() {
                for pack in meta_packs {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    match fetcher.prefetch_pack(pack).await {
                        Ok(n) => budget.spend(n).await,
                        Err(e) => tracing::warn!("prefetching metadata pack {pack}: {e}"),
                    }
                }
            }
            if !matches!(opts.prefetch, PrefetchTrace::Off) && !fetcher.cache().is_owner() {
                // Only the owner keeps what it fetches: the trace would be downloaded and dropped.
                return tracing::info!(
                    "not prefetching the access trace: chunk cache {} is owned by another process",
                    fetcher.cache().dir().display()
                );
            }
            let ids = match load_trace(&fetcher, &opts.prefetch, &snapshot).await {
                Ok(Some(ids)) => ids,
                Ok(None) => return,
                Err(e) => return tracing::warn!("prefetch trace: {e}"),
            };
            tracing::debug!("prefetching {} traced chunks", ids.len());
            for batch in batches(&fetcher, &ids) {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let n = fetcher.prefetch(&batch).await;
                budget.spend(n).await;
            }
            tracing::debug!("prefetch done in {:?}", started.elapsed());
        });
    }
}

impl Drop for MountedSnapshot {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if self.session.as_ref().is_some_and(|t| !t.is_finished()) {
            let _ = self.unmounter.lock().map(|mut u| u.unmount());
        }
        // After the unmount: a push to the kernel in progress then fails fast.
        self.inner.primer.stop();
    }
}

struct Budget {
    rate: u64,
    started: Instant,
    spent: u64,
}

impl Budget {
    async fn spend(&mut self, bytes: u64) {
        self.spent += bytes;
        let due = Duration::from_secs_f64(self.spent as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Trace chunks in groups of about one range read.
fn batches(fetcher: &Fetcher, ids: &[ChunkId]) -> Vec<Vec<ChunkId>> {
    let mut out = vec![Vec::new()];
    let mut bytes = 0u64;
    for id in ids {
        let Ok(loc) = fetcher.repo().locate(id) else { continue };
        if bytes >= crate::fetch::MAX_RANGE {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += loc.entry.stored_len as u64;
        out.last_mut().expect("one batch at least").push(*id);
    }
    out
}

async fn load_trace(
    fetcher: &Fetcher,
    source: &PrefetchTrace,
    snapshot: &Id,
) -> Result<Option<Vec<ChunkId>>, MountError> {
    let (bytes, name) = match source {
        PrefetchTrace::Off => return Ok(None),
        PrefetchTrace::File(path) => {
            let b = std::fs::read(path).map_err(|e| MountError::Io { path: path.clone(), source: e })?;
            (bytes::Bytes::from(b), path.display().to_string())
        }
        PrefetchTrace::Stored => {
            let name = trace::object_name(snapshot);
            match fetcher.repo().get(&name).await {
                Ok(b) => (b, name),
                Err(cairn_store::Error::NotFound(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    };
    Ok(Some(Trace::decode(&bytes, &name)?.chunks))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn write_stats(path: &Path, report: &StatsReport) {
    let json = serde_json::to_vec_pretty(report).expect("stats serialize");
    if let Err(e) = write_atomic(path, &json) {
        tracing::warn!("writing {}: {e}", path.display());
    }
}

/// Unmount `path`, also when the daemon that served it is gone (a stale mount).
pub fn unmount(path: &Path) -> Result<(), MountError> {
    let run = |args: &[&str]| std::process::Command::new("fusermount3").args(args).arg(path).output();
    let first = run(&["-u"]).map_err(|e| MountError::Unmount {
        path: path.into(),
        message: format!("cannot run fusermount3 ({e}); install fuse3"),
    })?;
    if first.status.success() {
        return Ok(());
    }
    // Busy or disconnected: detach it so new opens fail and it goes once unused.
    let lazy =
        run(&["-u", "-z"]).map_err(|e| MountError::Unmount { path: path.into(), message: e.to_string() })?;
    if lazy.status.success() {
        tracing::warn!("{} was busy or stale; detached it lazily", path.display());
        return Ok(());
    }
    Err(MountError::Unmount {
        path: path.into(),
        message: String::from_utf8_lossy(&first.stderr).trim().to_string(),
    })
}
