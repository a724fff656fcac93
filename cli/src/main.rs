//! `cairn`: the command line. Each subcommand parses its arguments, calls one library
//! function of `cairn-store` (or `cairn-fuse`, `cairn-gc`) and prints the result, as text
//! for people or as JSON with `--json`.

/// `println!` that returns the error instead of panicking when stdout is closed early
/// (`cairn snapshots | head -1`); `main` treats a broken pipe as success.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod gc_cmd;
mod mount_cmd;
mod progress;
mod volume_cmd;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use cairn_store::commands;
use cairn_store::format::config::{Chunking, MemoryCut};
use cairn_store::push::{ParentSpec, PushOptions};
use cairn_store::{Kind, Repository};
use clap::{Parser, Subcommand, ValueEnum};

/// Exit codes, documented in `cairn --help` and docs/operations.md.
const EXIT_ERROR: u8 = 1;
/// Bad arguments: clap's own errors, and the library's `Usage` errors (a bad name, a path
/// that is not a directory, an unknown option value).
const EXIT_USAGE: u8 = 2;
const EXIT_DAMAGE: u8 = 3;
/// A conditional write lost a race (a volume head moved, a revoked push lease, a concurrent
/// gc): nothing was committed; retry.
const EXIT_CONFLICT: u8 = 4;
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Content-addressed snapshots of sandbox filesystems and memory images",
    after_help = "Exit codes: 0 success, 1 error, 2 usage error, 3 check found damage, 4 conflict (retry), 130 interrupted.\n\
                  Logging: RUST_LOG=cairn_store=debug (to stderr)."
)]
struct Cli {
    /// Repository: a directory path, file:///path, s3://bucket/prefix (AWS_* environment) or memory://.
    #[arg(long, short = 'r', env = "CAIRN_REPO", global = true)]
    repo: Option<String>,
    /// Local cache directory (default $XDG_CACHE_HOME/cairn). Deleting it loses nothing.
    #[arg(long, env = "CAIRN_CACHE_DIR", global = true)]
    cache_dir: Option<PathBuf>,
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Fs,
    Memory,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new repository.
    Init {
        /// Average content-defined chunk size for files, in bytes (min = avg/4, max = avg*4).
        #[arg(long)]
        fs_chunk_avg: Option<u32>,
        /// Chunk size for memory images, in bytes: the average for `--memory-cut pages`
        /// (a multiple of 16384; min = size/4, max = size*4), the size for `fixed` (a
        /// multiple of 4096). Default 262144.
        #[arg(long)]
        memory_chunk: Option<u32>,
        /// How memory images are cut, always on page boundaries: `pages` (default) cuts where
        /// the page content says, so the same pages at other offsets dedup; `fixed` cuts a
        /// grid of --memory-chunk bytes.
        #[arg(long, value_parser = ["pages", "fixed"])]
        memory_cut: Option<String>,
        /// zstd level for chunks (default 3; 1 = fastest; higher stores less, pushes slower).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=19))]
        zstd_level: Option<i32>,
    },
    /// Store a directory (or, with --kind memory, a memory image file) as a new snapshot.
    /// Prints the new snapshot id as the last line of stdout.
    Push {
        path: PathBuf,
        #[arg(long, value_enum, default_value = "fs")]
        kind: KindArg,
        /// A key=value tag; repeatable.
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// auto (latest snapshot of this host and path), none, or a snapshot id.
        #[arg(long, default_value = "auto")]
        parent: String,
        /// Let the snapshot expire after this long (e.g. 7d, 12h).
        #[arg(long, value_parser = humantime::parse_duration)]
        expire_in: Option<std::time::Duration>,
        /// Host name recorded in the snapshot (default: this machine's).
        #[arg(long)]
        host: Option<String>,
        /// Commit the directory as the next version of this volume (exit code 4 when another
        /// host committed first; retry).
        #[arg(long, conflicts_with_all = ["kind", "parent", "expire_in", "tags", "host"])]
        volume: Option<String>,
        /// With --volume: commit only if the head is still at this version (else exit code 4).
        #[arg(long, requires = "volume")]
        expect_version: Option<u64>,
    },
    /// List snapshots, oldest first.
    Snapshots,
    /// Show one snapshot's root object.
    Show { snapshot: String },
    /// List a directory of a snapshot: SNAPSHOT[:/path].
    Ls {
        target: String,
        /// List everything below, not just one level.
        #[arg(long, short = 'R')]
        recursive: bool,
    },
    /// Write one file of a snapshot to stdout: SNAPSHOT:/path.
    Cat { target: String },
    /// Restore a snapshot (or SNAPSHOT:/path) into a directory.
    Restore { target: String, dir: PathBuf },
    /// Show what changed between two snapshots.
    Diff { a: String, b: String },
    /// Repository totals: snapshots, packs, chunks, bytes.
    Stats,
    /// Verify the repository: structure, and with --read-data every chunk's BLAKE3.
    Check {
        #[arg(long)]
        read_data: bool,
    },
    /// Remove snapshots that expired or that no retention rule keeps (roots only; `gc` frees
    /// their chunks). Rules count snapshots per host and source path, newest first.
    Forget(gc_cmd::ForgetArgs),
    /// Delete packs no snapshot needs and compact the index; safe while other hosts push.
    Gc(gc_cmd::GcArgs),
    /// Mount a snapshot read-only and lazily, or with --rw a volume read-write; runs in the
    /// foreground until unmounted (Ctrl-C, SIGTERM or `cairn umount`).
    Mount(mount_cmd::MountArgs),
    /// Unmount a cairn mount, also when its daemon died (stale mount).
    Umount { mountpoint: PathBuf },
    /// Named, versioned volumes: create, list, show, history, rollback, delete, commit.
    Volume {
        #[command(subcommand)]
        command: volume_cmd::VolumeCommand,
    },
    /// The host-wide chunk cache shared by all mounts.
    Cache {
        #[command(subcommand)]
        command: mount_cmd::CacheCommand,
    },
}

/// glibc gives threads that allocate their own arenas (up to 8 per core) and keeps what is
/// freed in each: a 10M-chunk `gc` held 308 MiB of RSS with the default and 237 MiB with two
/// arenas, in the same time. Must run before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// A restore holds a descriptor per directory on its way and per file in flight, and
/// RocksDB up to 256: the usual soft limit of 1024 is too tight for wide trees. The hard
/// limit is what the system allows this process anyway (as Go raises it for restic).
fn raise_open_file_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The error and its causes, each said once: errors of ours and of `object_store` end their
/// message with their cause's, so `{:#}` said the same cause two or three times.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    raise_open_file_limit();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,fuser=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // Commands that read the flag stop cleanly; the others (inspection, forget: which change
    // nothing until their last step, or only through conditional writes) exit at once. GC
    // stops to release its claim on gc/state: killed, it would hold off the next run for the
    // lease timeout.
    let stops_cleanly = matches!(
        cli.command,
        Command::Push { .. }
            | Command::Restore { .. }
            | Command::Mount(_)
            | Command::Volume { .. }
            | Command::Gc(_)
    );
    let interrupted = match cli.command {
        Command::Gc(_) => "interrupted: gc stopped where it was safe to; the next run finishes the job",
        _ => "interrupted: nothing was committed",
    };
    runtime.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            if !stops_cleanly {
                eprintln!("interrupted");
                std::process::exit(EXIT_INTERRUPTED as i32);
            }
            eprintln!("interrupted; stopping (press Ctrl-C again to exit at once)");
            flag.store(true, Ordering::SeqCst);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(EXIT_INTERRUPTED as i32);
            }
        }
    });
    match runtime.block_on(run(cli, &cancel)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if matches!(e.downcast_ref::<cairn_store::Error>(), Some(cairn_store::Error::Interrupted)) {
                eprintln!("{interrupted}");
                return ExitCode::from(EXIT_INTERRUPTED);
            }
            // `cairn ls … | head` closing the pipe early is not an error.
            let broken_pipe = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if broken_pipe {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", describe(&e));
            if is_conflict(&e) {
                return ExitCode::from(EXIT_CONFLICT);
            }
            if e.chain().any(|c| matches!(c.downcast_ref(), Some(cairn_store::Error::Usage(_)))) {
                return ExitCode::from(EXIT_USAGE);
            }
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// A lost race anywhere in the chain (the mount crate wraps store errors transparently).
fn is_conflict(e: &anyhow::Error) -> bool {
    use cairn_store::Error::Conflict;
    e.chain().any(|c| {
        matches!(c.downcast_ref::<cairn_store::Error>(), Some(Conflict(_)))
            || matches!(
                c.downcast_ref::<cairn_fuse::MountError>(),
                Some(cairn_fuse::MountError::Store(Conflict(_)))
            )
    })
}

fn repo_url(cli: &Cli) -> Result<String> {
    cli.repo.clone().ok_or_else(|| anyhow!("no repository given: use --repo or set CAIRN_REPO"))
}

fn cache_root(cli: &Cli) -> PathBuf {
    cli.cache_dir.clone().unwrap_or_else(cairn_store::cache::default_cache_root)
}

async fn open(cli: &Cli) -> Result<Repository> {
    let url = repo_url(cli)?;
    Repository::open(&url, &cache_root(cli)).await.with_context(|| format!("opening repository {url}"))
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    // Back to the io::Error it wraps, so a closed pipe is seen as one.
    serde_json::to_writer_pretty(&mut out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

/// Split `SNAPSHOT:/path` into its parts.
fn split_target(target: &str) -> (&str, Option<&str>) {
    match target.split_once(':') {
        Some((snap, path)) => (snap, Some(path)),
        None => (target, None),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

async fn run(cli: Cli, cancel: &AtomicBool) -> Result<u8> {
    match &cli.command {
        Command::Init { fs_chunk_avg, memory_chunk, memory_cut, zstd_level } => {
            let mut chunking = Chunking::default();
            if let Some(avg) = fs_chunk_avg {
                chunking.fs_avg = *avg;
                chunking.fs_min = avg / 4 / 2 * 2;
                chunking.fs_max = avg.saturating_mul(4);
            }
            if let Some(m) = memory_chunk {
                chunking.memory = *m;
            }
            if memory_cut.as_deref() == Some("fixed") {
                chunking.memory_cut = MemoryCut::Fixed;
            }
            let url = repo_url(&cli)?;
            let repo = Repository::init(&url, chunking, *zstd_level, &cache_root(&cli)).await?;
            if cli.json {
                print_json(repo.config())?;
            } else {
                outln!("created repository {} at {url}", repo.config().id)?;
            }
        }
        Command::Push { path, volume: Some(name), expect_version, .. } => {
            let repo = open(&cli).await?;
            let bar = progress::Bar::bytes(None, "push");
            let result =
                cairn_store::volume::push_dir(&repo, name, path, *expect_version, &bar, cancel).await;
            bar.finish();
            let (summary, head) =
                result.with_context(|| format!("pushing {} to volume {name}", path.display()))?;
            volume_cmd::report_commit(&summary, &head, cli.json)?;
        }
        Command::Push { path, kind, tags, parent, expire_in, host, volume: None, .. } => {
            let repo = open(&cli).await?;
            let tags = tags
                .iter()
                .map(|t| t.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
                .collect::<Option<BTreeMap<_, _>>>()
                .ok_or_else(|| anyhow!("tags must look like key=value"))?;
            let opts = PushOptions {
                source: path.clone(),
                kind: match kind {
                    KindArg::Fs => Kind::Fs,
                    KindArg::Memory => Kind::Memory,
                },
                tags,
                parent: match parent.as_str() {
                    "auto" => ParentSpec::Auto,
                    "none" => ParentSpec::None,
                    id => ParentSpec::Id(id.to_string()),
                },
                expire_in: *expire_in,
                host: host.clone(),
                label: None,
                overlay: None,
            };
            let bar = progress::Bar::bytes(None, "push");
            let result = cairn_store::push::push(&repo, &opts, &bar, cancel).await;
            bar.finish();
            let summary = result.with_context(|| format!("pushing {}", path.display()))?;
            let s = &summary.stats;
            if cli.json {
                // The JSON says it all; the text summary is for terminals and logs.
                print_json(&summary)?;
                return Ok(0);
            }
            eprintln!(
                "pushed {} files, {} dirs, {} other; {} logical, {} read ({} files unchanged)\n\
                 new: {} chunks, {} plain, {} stored in {} packs; {}\n\
                 {} requests ({} PUT, {} GET, {} HEAD, {} LIST, {} DELETE), {} up, {:.2}s",
                s.files,
                s.dirs,
                s.others,
                bytes(s.bytes),
                bytes(s.bytes_read),
                summary.files_unchanged,
                s.new_chunks,
                bytes(s.new_bytes),
                bytes(s.stored_bytes),
                summary.packs,
                if s.stored_bytes == 0 {
                    "all of it was stored already".to_string()
                } else {
                    format!("dedup+compression ratio {:.2}", summary.dedup_ratio())
                },
                summary.requests.requests(),
                summary.requests.puts,
                summary.requests.gets,
                summary.requests.heads,
                summary.requests.lists,
                summary.requests.deletes,
                bytes(summary.requests.bytes_up),
                summary.seconds,
            );
            outln!("{}", summary.snapshot)?;
        }
        Command::Snapshots => {
            let repo = open(&cli).await?;
            let snaps = repo.snapshots().await?;
            if cli.json {
                let list: Vec<_> = snaps
                    .iter()
                    .map(|(id, s)| serde_json::json!({"id": id.to_hex(), "snapshot": s}))
                    .collect();
                print_json(&list)?;
            } else {
                outln!(
                    "{:<10} {:<20} {:<12} {:<6} {:>10}  source / tags",
                    "id",
                    "time",
                    "host",
                    "kind",
                    "size"
                )?;
                for (id, s) in &snaps {
                    let tags: Vec<String> = s.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    outln!(
                        "{:<10} {:<20} {:<12} {:<6} {:>10}  {} {}",
                        id.short(),
                        s.time.get(..19).unwrap_or(&s.time),
                        s.host,
                        format!("{:?}", s.kind).to_lowercase(),
                        bytes(s.stats.bytes),
                        s.source,
                        tags.join(",")
                    )?;
                }
                outln!("{} snapshots", snaps.len())?;
            }
        }
        Command::Show { snapshot } => {
            let repo = open(&cli).await?;
            let (id, snap) = repo.resolve_snapshot(snapshot).await?;
            if cli.json {
                print_json(&serde_json::json!({"id": id.to_hex(), "snapshot": snap}))?;
            } else {
                outln!("snapshot {id}")?;
                outln!(
                    "time     {}\nhost     {}\nsource   {}\nkind     {:?}",
                    snap.time,
                    snap.host,
                    snap.source,
                    snap.kind
                )?;
                outln!("parent   {}", snap.parent.map(|p| p.to_hex()).unwrap_or_else(|| "-".into()))?;
                outln!("expires  {}", snap.expires.as_deref().unwrap_or("never"))?;
                for (k, v) in &snap.tags {
                    outln!("tag      {k}={v}")?;
                }
                let s = &snap.stats;
                outln!(
                    "contents {} files, {} dirs, {} other, {}\nstored   {} new chunks, {} new plain, {} packed",
                    s.files, s.dirs, s.others, bytes(s.bytes), s.new_chunks, bytes(s.new_bytes), bytes(s.stored_bytes)
                )?;
            }
        }
        Command::Ls { target, recursive } => {
            let repo = open(&cli).await?;
            let (spec, path) = split_target(target);
            let (_, snap) = repo.resolve_snapshot(spec).await?;
            let entries = commands::ls(&repo, &snap, path.unwrap_or("/"), *recursive).await?;
            if cli.json {
                print_json(&entries)?;
            } else {
                let mut out = std::io::stdout().lock();
                for e in entries {
                    let target = e.target.map(|t| format!(" -> {t}")).unwrap_or_default();
                    writeln!(
                        out,
                        "{:<8} {:>5o} {:>5}:{:<5} {:>12} {} {}{}",
                        e.kind, e.mode, e.uid, e.gid, e.size, e.mtime, e.path, target
                    )?;
                }
            }
        }
        Command::Cat { target } => {
            let repo = open(&cli).await?;
            let (spec, path) = split_target(target);
            let path = path.ok_or_else(|| anyhow!("cat needs SNAPSHOT:/path"))?;
            let (_, snap) = repo.resolve_snapshot(spec).await?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout());
            commands::cat(&repo, &snap, path, &mut out).await?;
            out.flush()?;
        }
        Command::Restore { target, dir } => {
            let repo = open(&cli).await?;
            let (spec, path) = split_target(target);
            let (id, snap) = repo.resolve_snapshot(spec).await?;
            let bar = progress::Bar::bytes(Some(snap.stats.bytes), "restore");
            let result = cairn_store::restore::restore(&repo, &snap, path, dir, &bar, cancel).await;
            bar.finish();
            let summary =
                result.with_context(|| format!("restoring {} into {}", id.short(), dir.display()))?;
            if cli.json {
                print_json(&summary)?;
            } else {
                eprintln!(
                    "restored {} files, {} dirs, {} other, {} in {:.2}s; {} requests, {} down",
                    summary.files,
                    summary.dirs,
                    summary.others,
                    bytes(summary.bytes),
                    summary.seconds,
                    summary.requests.requests(),
                    bytes(summary.requests.bytes_down)
                );
            }
        }
        Command::Diff { a, b } => {
            let repo = open(&cli).await?;
            let (_, sa) = repo.resolve_snapshot(a).await?;
            let (_, sb) = repo.resolve_snapshot(b).await?;
            let changes = commands::diff(&repo, &sa.root, &sb.root).await?;
            if cli.json {
                print_json(&changes)?;
            } else {
                let mut out = std::io::stdout().lock();
                for c in &changes {
                    let mark = match c.change {
                        commands::Change::Added => "+",
                        commands::Change::Removed => "-",
                        commands::Change::Modified => "M",
                        commands::Change::Metadata => "U",
                    };
                    writeln!(out, "{mark} {}", c.path)?;
                }
            }
        }
        Command::Stats => {
            let repo = open(&cli).await?;
            let stats = commands::repo_stats(&repo).await?;
            if cli.json {
                print_json(&stats)?;
            } else {
                outln!("snapshots       {}", stats.snapshots)?;
                outln!("logical bytes   {}", bytes(stats.logical_bytes))?;
                outln!("unique bytes    {} in {} chunks", bytes(stats.unique_bytes), stats.chunks)?;
                outln!(
                    "stored bytes    {} in {} data + {} metadata packs",
                    bytes(stats.pack_bytes),
                    stats.data_packs,
                    stats.meta_packs
                )?;
                outln!("index segments  {}", stats.index_segments)?;
            }
        }
        Command::Check { read_data } => {
            let repo = open(&cli).await?;
            let report = commands::check(&repo, *read_data).await?;
            if cli.json {
                print_json(&report)?;
            } else {
                outln!(
                    "checked {} snapshots, {} trees, {} chunk references, {} packs ({} read, {})",
                    report.snapshots,
                    report.trees,
                    report.chunks_referenced,
                    report.packs,
                    report.packs_read,
                    bytes(report.bytes_read)
                )?;
                for d in &report.damage {
                    let place = match (&d.snapshot, &d.path) {
                        (Some(s), Some(p)) => format!("snapshot {} {p}: ", &s[..8]),
                        (Some(s), None) => format!("snapshot {}: ", &s[..8]),
                        _ => String::new(),
                    };
                    outln!("DAMAGE {place}{}", d.problem)?;
                }
                if report.is_ok() {
                    outln!("no damage found")?;
                }
            }
            if !report.is_ok() {
                return Ok(EXIT_DAMAGE);
            }
        }
        Command::Forget(args) => {
            let repo = open(&cli).await?;
            gc_cmd::forget(&repo, args, cli.json).await?;
        }
        Command::Gc(args) => {
            // GC reads the index from the bucket as it goes: no local cache, no RocksDB.
            let url = repo_url(&cli)?;
            let repo =
                Repository::open_bare(&url).await.with_context(|| format!("opening repository {url}"))?;
            gc_cmd::gc(&repo, args, cli.json, cancel).await?;
        }
        Command::Mount(args) if args.rw => {
            let repo = open(&cli).await?;
            volume_cmd::mount_rw(repo, &cache_root(&cli), args, cli.json, cancel).await?;
        }
        Command::Mount(args) => {
            let repo = open(&cli).await?;
            mount_cmd::mount(repo, &cache_root(&cli), args, cli.json, cancel).await?;
        }
        Command::Umount { mountpoint } if volume_cmd::is_rw_mount(mountpoint) => {
            volume_cmd::unmount(mountpoint)?;
        }
        Command::Umount { mountpoint } => {
            cairn_fuse::unmount(mountpoint)?;
        }
        Command::Volume { command } => {
            if volume_cmd::commit_via_daemon(command, cli.json).await? {
                return Ok(0);
            }
            let repo = open(&cli).await?;
            volume_cmd::run(&repo, command, cli.json, cancel).await?;
        }
        Command::Cache { command } => mount_cmd::cache(&cache_root(&cli), command, cli.json)?,
    }
    Ok(0)
}
