//! `cairn volume …` and `cairn mount --rw`: thin adapters over `cairn_store::volume` and
//! `cairn_fuse::rw`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use cairn_fuse::rw;
use cairn_store::format::volume::Head;
use cairn_store::push::PushSummary;
use cairn_store::{volume, Repository};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a volume at version 1: empty, or holding what a snapshot holds.
    Create {
        name: String,
        /// Start from this snapshot (id, unique prefix or `latest`).
        #[arg(long)]
        from: Option<String>,
    },
    /// List volumes with their current version.
    List,
    /// Show a volume's head.
    Show { name: String },
    /// List a volume's versions, oldest first.
    History { name: String },
    /// Make a new version that holds what VERSION held (history is never rewritten).
    Rollback { name: String, version: u64 },
    /// Delete a volume's head; its versions stay as snapshots until forgotten.
    Delete { name: String },
    /// Commit a writable mount (`cairn mount --rw`) as the volume's next version; the mount
    /// goes on, now on that version. Exit code 4 when another host committed first.
    Commit {
        /// The mountpoint of the writable mount.
        #[arg(required_unless_present = "state_dir")]
        mountpoint: Option<PathBuf>,
        /// The mount's state directory (instead of its mountpoint, e.g. after it stopped).
        #[arg(long, conflicts_with = "mountpoint")]
        state_dir: Option<PathBuf>,
    },
}

fn print_head(h: &Head) -> std::io::Result<()> {
    let last = h.history.last();
    outln!(
        "{:<24} v{:<5} {} {} {}",
        h.name,
        h.version,
        h.snapshot.short(),
        last.map(|v| v.time.get(..19).unwrap_or(&v.time)).unwrap_or("-"),
        last.map(|v| v.host.as_str()).unwrap_or("-")
    )
}

pub async fn run(repo: &Repository, cmd: &VolumeCommand, json: bool, cancel: &AtomicBool) -> Result<()> {
    match cmd {
        VolumeCommand::Create { name, from } => {
            let head = volume::create(repo, name, from.as_deref()).await?;
            if json {
                crate::print_json(&head)?;
            } else {
                outln!("created volume {name} at version 1 (snapshot {})", head.snapshot.short())?;
            }
        }
        VolumeCommand::List => {
            let heads = volume::list(repo).await?;
            if json {
                crate::print_json(&heads)?;
            } else {
                outln!("{:<24} {:<6} {:<8} {:<19} host", "volume", "head", "snapshot", "committed")?;
                heads.iter().try_for_each(print_head)?;
                outln!("{} volumes", heads.len())?;
            }
        }
        VolumeCommand::Show { name } => {
            let head = volume::read(repo, name).await?.head;
            if json {
                crate::print_json(&head)?;
            } else {
                outln!("volume   {}\nversion  {}\nsnapshot {}", head.name, head.version, head.snapshot)?;
                if let Some(v) = head.history.last() {
                    outln!("time     {}\nhost     {}\nhow      {}", v.time, v.host, v.how)?;
                }
                outln!("versions {} listed (from v{})", head.history.len(), head.first_listed())?;
            }
        }
        VolumeCommand::History { name } => {
            let head = volume::read(repo, name).await?.head;
            if json {
                crate::print_json(&head.history)?;
            } else {
                if head.first_listed() > 1 {
                    outln!(
                        "(versions before v{} are not listed in the head; they are snapshots tagged {}={}, \
                         and rollback still reaches them)",
                        head.first_listed(),
                        cairn_store::format::volume::ID_TAG,
                        head.id
                    )?;
                }
                for v in &head.history {
                    outln!("v{:<5} {} {} {:<12} {}", v.version, v.snapshot.short(), v.time, v.host, v.how)?;
                }
            }
        }
        VolumeCommand::Rollback { name, version } => {
            let head = volume::rollback(repo, name, *version).await?;
            if json {
                crate::print_json(&head)?;
            } else {
                outln!("volume {name} is at version {} (the contents of version {version})", head.version)?;
            }
        }
        VolumeCommand::Delete { name } => {
            let head = volume::delete(repo, name).await?;
            if json {
                crate::print_json(&head)?;
            } else {
                outln!(
                    "deleted volume {name} (was at version {}); its snapshots stay until `cairn forget --volume {name}`",
                    head.version
                )?;
            }
        }
        VolumeCommand::Commit { mountpoint, state_dir } => {
            let dir = commit_state_dir(mountpoint, state_dir)?;
            let (summary, head) = rw::commit(repo, &dir, cancel).await?;
            report_commit(&summary, &head, json)?;
        }
    }
    Ok(())
}

fn commit_state_dir(mountpoint: &Option<PathBuf>, state_dir: &Option<PathBuf>) -> Result<PathBuf> {
    match (state_dir, mountpoint) {
        (Some(d), _) => Ok(d.clone()),
        (None, Some(m)) => Ok(rw::state_dir_of(m)?),
        (None, None) => Err(anyhow!("give a mountpoint or --state-dir")),
    }
}

/// `volume commit` of a running mount is done by its daemon; this needs no repository (and
/// so does not open the local cache the daemon owns). `false` when it is not that case.
pub async fn commit_via_daemon(cmd: &VolumeCommand, json: bool) -> Result<bool> {
    let VolumeCommand::Commit { mountpoint, state_dir } = cmd else { return Ok(false) };
    let dir = commit_state_dir(mountpoint, state_dir)?;
    match control::request_commit(&dir).await? {
        Some(result) => {
            let (summary, head) = result?;
            report_commit(&summary, &head, json)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

pub fn report_commit(summary: &PushSummary, head: &Head, json: bool) -> Result<()> {
    if json {
        crate::print_json(&serde_json::json!({ "head": head, "summary": summary }))?;
    } else {
        let s = &summary.stats;
        eprintln!(
            "committed volume {} version {}: {} changed files ({} read), {} stored in {} packs; \
             {} requests, {} up, {} down, {:.2}s",
            head.name,
            head.version,
            s.files,
            crate::bytes(s.bytes_read),
            crate::bytes(s.stored_bytes),
            summary.packs,
            summary.requests.requests(),
            crate::bytes(summary.requests.bytes_up),
            crate::bytes(summary.requests.bytes_down),
            summary.seconds
        );
        outln!("{}", summary.snapshot)?;
    }
    Ok(())
}

/// `cairn mount --rw VOLUME MOUNTPOINT`: serve until unmounted, then optionally commit.
pub async fn mount_rw(
    repo: Repository,
    cache_root: &Path,
    args: &crate::mount_cmd::MountArgs,
    json: bool,
    cancel: &AtomicBool,
) -> Result<()> {
    let name = &args.snapshot;
    // Before the mount appears (see mount_cmd::mount): SIGTERM, SIGHUP and SIGQUIT then
    // always unmount cleanly.
    let mut signals = crate::mount_cmd::StopSignals::register()?;
    let state_dir = args.state_dir.clone().unwrap_or_else(|| rw::default_state_dir(name));
    let cache = Arc::new(crate::mount_cmd::open_cache(cache_root, &args.cache)?);
    let repo = Arc::new(repo);
    let mounted = rw::mount_rw(
        repo.clone(),
        cache,
        name,
        &args.mountpoint,
        &state_dir,
        crate::mount_cmd::mount_options(args),
    )
    .await
    .with_context(|| format!("mounting volume {name} read-write on {}", args.mountpoint.display()))?;
    let state_dir = mounted.state_dir().to_path_buf();
    let control = match control::listen(&state_dir) {
        Ok(c) => c,
        Err(e) => {
            mounted.finish().await?;
            return Err(e);
        }
    };
    eprintln!(
        "mounted volume {name} read-write on {} (changes in {}; `cairn volume commit` to commit, \
         Ctrl-C or `cairn umount` to stop)",
        args.mountpoint.display(),
        state_dir.display()
    );
    let commits = Arc::new(tokio::sync::Mutex::new(()));
    loop {
        tokio::select! {
            _ = signals.recv() => break,
            conn = control.accept() => {
                if let Ok((stream, _)) = conn {
                    // Its own task: a client that connects and says nothing must not hold up
                    // signals, unmount detection or other commits.
                    tokio::spawn(control::serve(stream, repo.clone(), state_dir.clone(), commits.clone()));
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if cancel.load(Ordering::SeqCst) || !mounted.is_mounted() {
                    break;
                }
            }
        }
    }
    // Unmount first when we can, so the committed state is the final one.
    let busy = mounted.unmount_overlay().is_err();
    let committed = if args.commit_on_unmount {
        if busy {
            tracing::warn!("{} is busy; committing its current state", args.mountpoint.display());
        }
        // After a commit a client asked for (control socket), not beside it: its lock would
        // make this one fail. A second Ctrl-C must not abandon it half-way: its own flag.
        let _turn = commits.lock().await;
        Some(rw::commit(&repo, &state_dir, &AtomicBool::new(false)).await)
    } else {
        None
    };
    drop(control);
    let _ = std::fs::remove_file(control::socket(&state_dir));
    // The commit's outcome first: a failure to tear down must not hide it.
    let finished = mounted.finish().await;
    match committed {
        Some(Ok((summary, head))) => report_commit(&summary, &head, json)?,
        Some(Err(e)) => {
            return Err(anyhow::Error::new(e)
                .context(format!("committing on unmount (changes kept in {})", state_dir.display())))
        }
        None => eprintln!(
            "unmounted {}; uncommitted changes stay in {}",
            args.mountpoint.display(),
            state_dir.display()
        ),
    }
    finished?;
    Ok(())
}

/// `cairn umount` of a writable mount.
pub fn is_rw_mount(path: &Path) -> bool {
    rw::is_overlay(path)
}

pub fn unmount(path: &Path) -> Result<()> {
    Ok(rw::unmount_overlay(path)?)
}

/// Commits of a running writable mount go through its daemon, which owns the local cache
/// (chunk index and file-change cache): a separate process would work in a scratch cache
/// and re-read every file of the upper layer. One JSON line each way over a Unix socket in
/// the state directory (reachable only by who can reach the state directory).
mod control {
    use std::path::{Path, PathBuf};

    use anyhow::Result;
    use cairn_fuse::rw;
    use cairn_store::format::volume::Head;
    use cairn_store::push::PushSummary;
    use serde::{Deserialize, Serialize};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{UnixListener, UnixStream};

    // One reply per commit over a socket: the size of its variants does not matter.
    #[allow(clippy::large_enum_variant)]
    #[derive(Serialize, Deserialize)]
    enum Reply {
        Committed { head: Head, summary: PushSummary },
        Failed { message: String, conflict: bool },
    }

    pub fn socket(state_dir: &Path) -> PathBuf {
        state_dir.join("control.sock")
    }

    pub fn listen(state_dir: &Path) -> Result<UnixListener> {
        use std::os::unix::fs::PermissionsExt;
        let path = socket(state_dir);
        let _ = std::fs::remove_file(&path); // left by a daemon that died; we hold mount.lock
        let listener = UnixListener::bind(&path)?;
        // The daemon commits with its own (root) rights: only its owner may ask it to.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(listener)
    }

    pub async fn serve(
        stream: UnixStream,
        repo: std::sync::Arc<cairn_store::Repository>,
        state_dir: PathBuf,
        queue: std::sync::Arc<tokio::sync::Mutex<()>>,
    ) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read);
        let request = reader.read_line(&mut line);
        match tokio::time::timeout(std::time::Duration::from_secs(10), request).await {
            Ok(Ok(_)) if line.trim() == "commit" => {}
            _ => return,
        }
        // One commit at a time; the next request waits its turn.
        let _turn = queue.lock().await;
        let reply = match rw::commit(&repo, &state_dir, &std::sync::atomic::AtomicBool::new(false)).await {
            Ok((summary, head)) => Reply::Committed { head, summary },
            Err(e) => Reply::Failed {
                conflict: matches!(&e, cairn_fuse::MountError::Store(cairn_store::Error::Conflict(_))),
                message: e.to_string(),
            },
        };
        let mut bytes = serde_json::to_vec(&reply).expect("reply serializes");
        bytes.push(b'\n');
        let _ = write.write_all(&bytes).await;
    }

    /// Ask the daemon of the mount using `state_dir` to commit; `None` when no daemon answers.
    pub async fn request_commit(state_dir: &Path) -> Result<Option<Result<(PushSummary, Head)>>> {
        let Ok(stream) = UnixStream::connect(socket(state_dir)).await else { return Ok(None) };
        let (read, mut write) = stream.into_split();
        write.write_all(b"commit\n").await?;
        let mut line = String::new();
        BufReader::new(read).read_line(&mut line).await?;
        if line.is_empty() {
            anyhow::bail!("the mount daemon closed the connection without answering (did it stop?)");
        }
        Ok(Some(match serde_json::from_str::<Reply>(&line)? {
            Reply::Committed { head, summary } => Ok((summary, head)),
            Reply::Failed { message, conflict: true } => Err(cairn_store::Error::Conflict(message).into()),
            Reply::Failed { message, conflict: false } => Err(anyhow::anyhow!(message)),
        }))
    }
}
