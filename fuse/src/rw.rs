//! Writable volume mounts: kernel overlayfs over a lazy read-only mount of the volume.
//!
//! Why overlayfs and not copy-on-write inside the FUSE filesystem: writes, renames, links and
//! fsync then run at local-disk speed in the kernel with POSIX semantics the kernel already
//! gets right, nothing of it crosses the FUSE boundary, and the changes land in a plain
//! directory (the upper layer) that survives any crash of this process. Reads of untouched
//! data still go to the lazy mount below. Commit reads only that upper layer
//! (`cairn_store::push::overlay`), so it costs what changed.
//!
//! A volume mount keeps its state in one directory (default
//! `$XDG_STATE_HOME/cairn/volumes/<name>`; not under the cache directory, which may be
//! deleted):
//! - `state.json` — which volume, which snapshot the lower layer shows (`base`) and which
//!   version the upper layer was last committed as or based on (`version`);
//! - `upper/`, `work/` — overlayfs's upper and work directories: the uncommitted changes;
//! - `lower/` — where the read-only lazy mount of `base` is mounted.
//!
//! Mounting again with the same state directory resumes: the same base below, the same upper
//! layer above, whatever happened to the previous daemon.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use cairn_store::push::PushSummary;
use cairn_store::volume;
use cairn_store::{Id, Repository};
use nix::mount::{MntFlags, MsFlags};
use serde::{Deserialize, Serialize};

use crate::mountinfo::{mount_at, unescape};

use crate::cache::ChunkCache;
use crate::mount::{mount, MountError, MountOptions, MountedSnapshot};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    pub format: u32,
    /// The repository's config id: a state directory never commits into another repository.
    pub repo: String,
    pub volume: String,
    /// The volume's id: an earlier volume of the same name is another volume.
    pub volume_id: String,
    /// This state directory's own id, recorded in the versions it commits.
    pub writer: String,
    /// The snapshot shown by the lower layer; the upper layer holds changes relative to it.
    pub base: Id,
    /// The volume version the current state was last committed as (or mounted from).
    pub version: u64,
}

fn io(path: &Path, source: std::io::Error) -> MountError {
    MountError::Io { path: path.into(), source }
}

/// `$XDG_STATE_HOME/cairn/volumes/<name>` (or `~/.local/state/...`).
pub fn default_state_dir(volume: &str) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    base.join("cairn/volumes").join(volume)
}

impl VolumeState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    pub fn load(dir: &Path) -> Result<Option<VolumeState>, MountError> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io(&path, std::io::Error::new(std::io::ErrorKind::InvalidData, e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, e)),
        }
    }

    /// Written to a temporary file, synced, then renamed: a crash leaves the old or the new.
    pub fn store(&self, dir: &Path) -> Result<(), MountError> {
        use std::io::Write;
        let path = Self::path(dir);
        let tmp = dir.join("state.json.tmp");
        let bytes = serde_json::to_vec_pretty(self).expect("state serializes");
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))
    }
}

/// An exclusive lock on a file of the state directory, held while the guard lives.
fn lock(dir: &Path, name: &str, what: &str) -> Result<nix::fcntl::Flock<std::fs::File>, MountError> {
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| MountError::Io {
        path: dir.into(),
        source: std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!("{what} is already running here"),
        ),
    })
}

/// Whether `path` is currently an overlay mountpoint.
pub fn is_overlay(path: &Path) -> bool {
    mount_at(path).is_some_and(|m| m.fstype == "overlay")
}

/// The state directory of the writable mount on `mountpoint` (its upper layer's parent).
pub fn state_dir_of(mountpoint: &Path) -> Result<PathBuf, MountError> {
    let m = mount_at(mountpoint).filter(|m| m.fstype == "overlay").ok_or_else(|| MountError::Unmount {
        path: mountpoint.into(),
        message: "not a writable volume mount".into(),
    })?;
    let upper =
        m.options.split(',').find_map(|o| o.strip_prefix("upperdir=").map(unescape)).ok_or_else(|| {
            MountError::Unmount { path: mountpoint.into(), message: "overlay without an upper layer".into() }
        })?;
    let dir = Path::new(&upper).parent().map(Path::to_path_buf).unwrap_or_default();
    if VolumeState::load(&dir)?.is_none() {
        return Err(MountError::Unmount {
            path: mountpoint.into(),
            message: format!("{} holds no cairn volume state", dir.display()),
        });
    }
    Ok(dir)
}

/// `cairn umount` of a writable mount: unmount the overlay. The daemon notices, commits if
/// asked to, and stops serving the lower layer. A busy mount is refused rather than
/// detached: its users could go on writing after a commit-on-unmount, and lose that.
pub fn unmount_overlay(path: &Path) -> Result<(), MountError> {
    nix::mount::umount(path).map_err(|e| MountError::Unmount {
        path: path.into(),
        message: match e {
            nix::errno::Errno::EBUSY => "busy: processes still use it; stop them first (or detach it with \
                                         `umount -l`, and nothing they write afterwards is committed)"
                .into(),
            e => e.to_string(),
        },
    })
}

/// Detach whatever is mounted on `path` (an overlay or a stale FUSE mount).
fn detach(path: &Path) {
    if let Some(m) = mount_at(path) {
        let r = if m.fstype == "overlay" {
            nix::mount::umount2(path, MntFlags::MNT_DETACH).map_err(|e| e.to_string())
        } else {
            crate::mount::unmount(path).map_err(|e| e.to_string())
        };
        if let Err(e) = r {
            tracing::warn!("detaching stale mount {}: {e}", path.display());
        }
    }
}

fn copy_root_attributes(root: &cairn_store::format::tree::Node, dir: &Path) -> Result<(), MountError> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let err = |e: std::io::Error| io(dir, e);
    nix::unistd::chown(dir, Some(root.uid.into()), Some(root.gid.into())).map_err(|e| err(e.into()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(root.mode & 0o7777)).map_err(err)?;
    for x in &root.xattrs {
        let name = std::ffi::OsStr::from_bytes(&x.name);
        if let Err(e) = xattr::set(dir, name, &x.value) {
            tracing::warn!("{}: setting {name:?} from the volume's root: {e}", dir.display());
        }
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(root.mtime_ns.max(0) as u64);
    std::fs::File::open(dir).and_then(|f| f.set_modified(t)).map_err(err)
}

/// A writable volume mount: overlayfs on the mountpoint over a lazy mount of `base`.
pub struct MountedVolume {
    pub lower: MountedSnapshot,
    mountpoint: PathBuf,
    state_dir: PathBuf,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Mount volume `name` read-write on `mountpoint`, keeping changes in `state_dir`.
pub async fn mount_rw(
    repo: Arc<Repository>,
    cache: Arc<ChunkCache>,
    name: &str,
    mountpoint: &Path,
    state_dir: &Path,
    opts: MountOptions,
) -> Result<MountedVolume, MountError> {
    std::fs::create_dir_all(state_dir).map_err(|e| io(state_dir, e))?;
    // Absolute, so the overlay's options (which `volume commit MOUNTPOINT` reads back from
    // mountinfo) name it from anywhere.
    let state_dir = &std::fs::canonicalize(state_dir).map_err(|e| io(state_dir, e))?;
    let guard = lock(state_dir, "mount.lock", "a mount of this state directory")?;
    let repo_id = repo.config().id.clone();
    let head = volume::read(&repo, name).await?.head;
    let mut new_state = false;
    let state = match VolumeState::load(state_dir)? {
        Some(s) if s.volume != name || s.repo != repo_id => {
            return Err(MountError::Io {
                path: state_dir.into(),
                source: std::io::Error::other(format!(
                    "holds changes to volume {} of repository {}, not {name} of {repo_id}",
                    s.volume, s.repo
                )),
            })
        }
        Some(s) => {
            tracing::info!("resuming the upper layer in {} over snapshot {}", state_dir.display(), s.base);
            s
        }
        None => {
            let s = VolumeState {
                format: 1,
                repo: repo_id,
                volume: name.into(),
                volume_id: head.id.clone(),
                writer: hex::encode(rand::random::<[u8; 8]>()),
                base: head.snapshot,
                version: head.version,
            };
            // Stored once mounted: a mount that fails must not pin this directory to a
            // head that others may move before the next attempt.
            new_state = true;
            s
        }
    };
    if head.id != state.volume_id {
        return Err(MountError::Io {
            path: state_dir.into(),
            source: std::io::Error::other(format!(
                "holds changes to an earlier volume named {name}, since deleted; move it away to mount the new one"
            )),
        });
    }
    let (lower, upper, work) = (state_dir.join("lower"), state_dir.join("upper"), state_dir.join("work"));
    // A daemon that died leaves a dead overlay and a disconnected FUSE mount behind: detach
    // those, and nothing else.
    if let Some(m) = mount_at(mountpoint) {
        let upper_opt = upper.display().to_string();
        let ours = m.fstype == "overlay"
            && m.options
                .split(',')
                .any(|o| o.strip_prefix("upperdir=").map(unescape).as_ref() == Some(&upper_opt));
        if !ours {
            return Err(MountError::Mount {
                path: mountpoint.into(),
                source: std::io::Error::other(format!("something else ({}) is mounted there", m.fstype)),
            });
        }
        detach(mountpoint);
    }
    if mount_at(&lower).is_some_and(|m| m.fstype.starts_with("fuse")) {
        detach(&lower);
    }
    let snap = repo.resolve_snapshot(&state.base.to_hex()).await?.1;
    let fresh_upper = new_state || !upper.exists();
    for d in [&lower, &upper, &work] {
        std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
    }
    if fresh_upper {
        // overlayfs shows the upper root's attributes: start them as the base root's.
        copy_root_attributes(&snap.root, &upper)?;
    }
    // The lower layer honours everything; the overlay's own flags decide what sandboxes get.
    let lower_opts = MountOptions { allow_other: false, dev: true, suid: true, ..opts.clone() };
    let lower_mount = mount(repo, cache, state.base, &snap, &lower, lower_opts).await?;
    let options = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=on,index=off,metacopy=off,xino=off",
        lower.display(),
        upper.display(),
        work.display()
    );
    let mut flags = MsFlags::MS_NOATIME;
    flags.set(MsFlags::MS_NODEV, !opts.dev);
    flags.set(MsFlags::MS_NOSUID, !opts.suid);
    if let Err(e) =
        nix::mount::mount(Some("cairn"), mountpoint, Some("overlay"), flags, Some(options.as_str()))
    {
        let _ = lower_mount.unmount();
        let _ = lower_mount.finish().await;
        return Err(MountError::Mount {
            path: mountpoint.into(),
            source: std::io::Error::other(format!("overlayfs ({options}): {e}")),
        });
    }
    if new_state {
        if let Err(e) = state.store(state_dir) {
            detach(mountpoint);
            let _ = lower_mount.unmount();
            let _ = lower_mount.finish().await;
            return Err(e);
        }
    }
    Ok(MountedVolume {
        lower: lower_mount,
        mountpoint: mountpoint.into(),
        state_dir: state_dir.into(),
        _lock: guard,
    })
}

impl MountedVolume {
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Still mounted (someone may have run `umount` on it).
    pub fn is_mounted(&self) -> bool {
        is_overlay(&self.mountpoint) && !self.lower.is_finished()
    }

    /// Unmount the overlay; `Err` when busy (files still open), which leaves it mounted.
    pub fn unmount_overlay(&self) -> Result<(), MountError> {
        if !is_overlay(&self.mountpoint) {
            return Ok(());
        }
        nix::mount::umount(&self.mountpoint)
            .map_err(|e| MountError::Unmount { path: self.mountpoint.clone(), message: e.to_string() })
    }

    /// Detach the overlay even if busy; open files keep working until closed.
    pub fn detach_overlay(&self) {
        detach(&self.mountpoint);
    }

    /// Unmount everything (the overlay lazily if busy) and stop serving the lower layer.
    pub async fn finish(self) -> Result<crate::StatsReport, MountError> {
        if self.unmount_overlay().is_err() {
            self.detach_overlay();
        }
        if !self.lower.is_finished() && self.lower.unmount().is_err() {
            crate::mount::unmount(self.lower.mountpoint())?;
        }
        self.lower.finish().await
    }
}

/// Whether this process can write and read back a `trusted.*` xattr in `dir`.
fn sees_trusted_xattrs(dir: &Path) -> bool {
    let probe = dir.join(".cairn-xattr-probe");
    let ok = std::fs::write(&probe, b"").is_ok()
        && xattr::set(&probe, "trusted.cairn.probe", b"1").is_ok()
        && matches!(xattr::get(&probe, "trusted.cairn.probe"), Ok(Some(v)) if v == b"1");
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Commit the state of a writable mount (by its state directory) as the volume's next
/// version. Whatever the upper layer holds is committed as it is at the time it is read:
/// pause the sandbox (or unmount) first for a point-in-time version.
pub async fn commit(
    repo: &Repository,
    state_dir: &Path,
    cancel: &AtomicBool,
) -> Result<(PushSummary, cairn_store::format::volume::Head), MountError> {
    // Whiteouts' companions (opaque directories, redirects) are `trusted.*` xattrs, which
    // only a privileged reader sees (not root in a user namespace); without them a commit
    // would be silently wrong.
    if !sees_trusted_xattrs(state_dir) {
        return Err(MountError::Io {
            path: state_dir.into(),
            source: std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "committing a writable mount needs CAP_SYS_ADMIN in the initial user namespace \
                 (overlayfs keeps renames and opaque directories in trusted.* xattrs)",
            ),
        });
    }
    let _guard = lock(state_dir, "commit.lock", "a commit of this state directory")?;
    let mut state = VolumeState::load(state_dir)?.ok_or_else(|| MountError::Io {
        path: state_dir.into(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no state.json: not a volume state directory",
        ),
    })?;
    if state.repo != repo.config().id {
        return Err(MountError::Io {
            path: state_dir.into(),
            source: std::io::Error::other(format!("belongs to repository {}", state.repo)),
        });
    }
    let upper = state_dir.join("upper");
    // Flush what writers left in the page cache of the upper filesystem; a commit reads files
    // directly, so this is only for durability of the state the new version describes.
    if let Ok(dir) = std::fs::File::open(&upper) {
        let _ = nix::unistd::syncfs(&dir);
    }
    let c = volume::OverlayCommit {
        name: &state.volume,
        volume_id: &state.volume_id,
        expected: state.version,
        base: state.base,
        writer: &state.writer,
    };
    let (summary, head) = volume::commit_overlay(repo, &c, &upper, cancel).await?;
    state.version = head.version;
    state.store(state_dir)?;
    Ok((summary, head))
}
