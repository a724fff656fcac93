//! `cairn mount`, `cairn umount` and `cairn cache`: thin adapters over `cairn-fuse`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_fuse::{CacheConfig, ChunkCache, MountOptions, PrefetchTrace};
use clap::{Args, Subcommand};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Where the host-wide chunk cache lives and how big it may grow.
#[derive(Args, Clone)]
pub struct CacheArgs {
    /// Hard cap on the host chunk cache (e.g. 8GiB).
    #[arg(long, env = "CAIRN_CHUNK_CACHE_MAX", default_value = "8GiB")]
    pub cache_max: bytesize::ByteSize,
    /// Keep at least this much space free on the cache's filesystem (e.g. 1GiB).
    #[arg(long, env = "CAIRN_CHUNK_CACHE_MIN_FREE", default_value = "1GiB")]
    pub cache_min_free: bytesize::ByteSize,
}

#[derive(Args)]
pub struct MountArgs {
    /// Snapshot id (or unique prefix, or `latest`); with --rw, a volume name.
    #[arg(value_name = "SNAPSHOT|VOLUME")]
    pub snapshot: String,
    pub mountpoint: PathBuf,
    /// Mount a volume read-write: overlayfs over a lazy mount of its head; changes stay in
    /// the state directory until `cairn volume commit`.
    #[arg(long)]
    pub rw: bool,
    /// Where a --rw mount keeps its changes (default $XDG_STATE_HOME/cairn/volumes/NAME).
    /// Mounting again with the same directory resumes its uncommitted changes.
    #[arg(long, requires = "rw")]
    pub state_dir: Option<PathBuf>,
    /// With --rw: commit the volume when the mount stops (unmount, Ctrl-C, SIGTERM, SIGHUP,
    /// SIGQUIT).
    #[arg(long, requires = "rw")]
    pub commit_on_unmount: bool,
    /// Let other users (sandbox users) in; permissions are still checked by the kernel.
    #[arg(long)]
    pub allow_other: bool,
    /// Honour the snapshot's device nodes (needs root); off by default.
    #[arg(long)]
    pub dev: bool,
    /// Honour setuid/setgid bits (needs root); off by default.
    #[arg(long)]
    pub suid: bool,
    /// Write the chunks this mount touches, in order, to FILE at unmount.
    #[arg(long, value_name = "FILE")]
    pub record_trace: Option<PathBuf>,
    /// Store the recorded trace with the snapshot at unmount; later mounts prefetch it.
    #[arg(long)]
    pub store_trace: bool,
    /// Prefetch from this trace file instead of the one stored with the snapshot.
    #[arg(long, value_name = "FILE", conflicts_with = "no_prefetch")]
    pub prefetch_trace: Option<PathBuf>,
    /// Do not prefetch anything in the background (metadata or trace).
    #[arg(long)]
    pub no_prefetch: bool,
    /// Bandwidth budget of background prefetch, per second (e.g. 100MiB).
    #[arg(long, default_value = "200MiB")]
    pub prefetch_rate: bytesize::ByteSize,
    /// Refresh a JSON file with this mount's counters every second.
    #[arg(long, value_name = "FILE")]
    pub stats_file: Option<PathBuf>,
    /// After a directory is listed, push its files up to this size into the kernel's page
    /// cache if their chunks are already on this host, so that reading them next costs no
    /// round trip to this daemon (0 turns it off; nothing is ever fetched for it).
    #[arg(long, value_name = "SIZE", default_value = "1MiB")]
    pub prime_max_file: bytesize::ByteSize,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Size, cap and owner of the host chunk cache.
    Stats {
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Delete every cached chunk (fails while a mount owns the cache).
    Clear {
        #[command(flatten)]
        cache: CacheArgs,
    },
}

/// Signals that stop a mount daemon. Each one's default action would kill the daemon and
/// leave a stale mount behind; handled, they unmount it cleanly (Ctrl-C is handled in main).
pub struct StopSignals {
    term: Signal,
    /// None when started ignoring SIGHUP (`nohup`): it asked to outlive its terminal.
    hangup: Option<Signal>,
    quit: Signal,
}

/// Whether the process started with SIGHUP ignored.
fn hangup_ignored() -> bool {
    // SAFETY: reads the current action into a zeroed struct; changes nothing.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

impl StopSignals {
    /// Register before the mount appears: a supervisor may signal as soon as it sees it.
    pub fn register() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            hangup: if hangup_ignored() { None } else { Some(signal(SignalKind::hangup())?) },
            quit: signal(SignalKind::quit())?,
        })
    }

    /// Wait for the next one; its name.
    pub async fn recv(&mut self) -> &'static str {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = async {
                match &mut self.hangup {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
            _ = self.quit.recv() => "SIGQUIT",
        };
        tracing::info!("{name}: unmounting");
        name
    }
}

pub fn open_cache(cache_root: &Path, args: &CacheArgs) -> Result<ChunkCache> {
    Ok(ChunkCache::open(cache_config(cache_root, args))?)
}

fn cache_config(cache_root: &Path, args: &CacheArgs) -> CacheConfig {
    let mut cfg = CacheConfig::new(cache_root.join("chunks"));
    cfg.max_bytes = args.cache_max.as_u64();
    cfg.min_free_bytes = args.cache_min_free.as_u64();
    cfg
}

/// The mount options a command line asks for.
pub fn mount_options(args: &MountArgs) -> MountOptions {
    MountOptions {
        allow_other: args.allow_other,
        dev: args.dev,
        suid: args.suid,
        record_trace: args.record_trace.clone(),
        store_trace: args.store_trace,
        prefetch: match (&args.prefetch_trace, args.no_prefetch) {
            (_, true) => PrefetchTrace::Off,
            (Some(f), false) => PrefetchTrace::File(f.clone()),
            (None, false) => PrefetchTrace::Stored,
        },
        prefetch_metadata: !args.no_prefetch,
        prefetch_rate: args.prefetch_rate.as_u64(),
        stats_file: args.stats_file.clone(),
        prime_max_file: args.prime_max_file.as_u64(),
        ..MountOptions::default()
    }
}

pub async fn mount(
    repo: cairn_store::Repository,
    cache_root: &Path,
    args: &MountArgs,
    json: bool,
    cancel: &AtomicBool,
) -> Result<()> {
    // Before the mount appears: a supervisor may stop it as soon as it sees it, and an
    // unhandled SIGTERM (or SIGHUP, SIGQUIT) would kill the daemon with the mount left behind.
    let mut signals = StopSignals::register()?;
    let cache = Arc::new(open_cache(cache_root, &args.cache)?);
    let (id, snap) = repo.resolve_snapshot(&args.snapshot).await?;
    let opts = mount_options(args);
    let mounted = cairn_fuse::mount(Arc::new(repo), cache, id, &snap, &args.mountpoint, opts)
        .await
        .with_context(|| format!("mounting snapshot {} on {}", id.short(), args.mountpoint.display()))?;
    eprintln!(
        "mounted snapshot {} on {} (Ctrl-C or `cairn umount` to stop)",
        id.short(),
        args.mountpoint.display()
    );
    loop {
        tokio::select! {
            _ = signals.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if cancel.load(Ordering::SeqCst) || mounted.is_finished() {
                    break;
                }
            }
        }
    }
    if !mounted.is_finished() {
        if let Err(e) = mounted.unmount() {
            // Busy (a process still has files open): detach so the daemon can exit cleanly.
            tracing::warn!("{e}; detaching lazily");
            cairn_fuse::unmount(&args.mountpoint)?;
        }
    }
    let report = mounted.finish().await?;
    if json {
        crate::print_json(&report)?;
    } else {
        eprintln!(
            "unmounted {}: {} reads, {} served, {} fetched in {} range reads, {} cache hits, {} misses",
            args.mountpoint.display(),
            report.reads,
            crate::bytes(report.read_bytes),
            crate::bytes(report.fetched_bytes),
            report.range_reads,
            report.memory_hits + report.cache_hits,
            report.misses
        );
    }
    Ok(())
}

pub fn cache(cache_root: &Path, cmd: &CacheCommand, json: bool) -> Result<()> {
    match cmd {
        CacheCommand::Stats { cache } => {
            let c = ChunkCache::inspect(cache_config(cache_root, cache))?;
            let s = c.stats();
            if json {
                crate::print_json(&s)?;
            } else {
                outln!("cache dir   {}", s.dir.display())?;
                if s.owner {
                    outln!("chunks      {}", s.chunks)?;
                    outln!(
                        "used        {} of {} cap",
                        crate::bytes(s.used_bytes),
                        crate::bytes(s.max_bytes)
                    )?;
                } else {
                    outln!("used        unknown: a running mount owns the cache")?;
                }
                outln!(
                    "free space  {} (floor {})",
                    crate::bytes(s.free_bytes),
                    crate::bytes(s.min_free_bytes)
                )?;
            }
        }
        CacheCommand::Clear { cache } => {
            let c = open_cache(cache_root, cache)?;
            let freed = c.clear()?;
            if json {
                crate::print_json(&serde_json::json!({ "freed_bytes": freed }))?;
            } else {
                outln!("cleared {} from {}", crate::bytes(freed), c.dir().display())?;
            }
        }
    }
    Ok(())
}
