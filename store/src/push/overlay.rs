//! Overlay commits: the upper directory of an overlayfs mount, merged with the snapshot the
//! mount was made over, becomes a new snapshot. Only what the upper layer holds is read;
//! every directory it does not touch is reused by id, so a commit costs what changed.
//!
//! How overlayfs records changes in the upper layer (kernel `Documentation/filesystems/
//! overlayfs.rst`), and what a commit makes of them:
//! - a *whiteout* (character device 0:0) deletes the lower entry of that name;
//! - an *opaque* directory (`trusted.overlay.opaque` = `y`) hides its lower directory;
//! - a *redirect* (`trusted.overlay.redirect`) on a renamed directory names where its lower
//!   contents now come from: an absolute path from the root, or a name in the parent's
//!   lower directory;
//! - a *metacopy* file (`trusted.overlay.metacopy`) has no data of its own; mounts are made
//!   with `metacopy=off`, so one is refused rather than committed empty;
//! - every other `trusted.overlay.*` attribute is bookkeeping and not part of the snapshot.

use std::collections::BTreeMap;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;

use rayon::prelude::*;

use super::source::{nanos, Anchored, Walker};
use crate::error::{Error, IoContext, Result};
use crate::format::snapshot;
use crate::format::tree::{Node, NodeKind};
use crate::id::Id;
use crate::repo::Repository;

pub const XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const OPAQUE: &str = "trusted.overlay.opaque";
const REDIRECT: &str = "trusted.overlay.redirect";
const METACOPY: &str = "trusted.overlay.metacopy";

/// The snapshot an overlay's lower layer shows: what its upper layer is relative to.
#[derive(Clone, Debug)]
pub struct OverlayBase {
    pub snapshot: Id,
    pub root: Node,
}

/// What the walk needs to read the lower layer's directories.
pub struct Overlay<'a> {
    pub repo: &'a Repository,
    /// The walk runs on blocking threads; tree reads are driven on this runtime.
    pub handle: tokio::runtime::Handle,
    pub root: Node,
}

type Lower = BTreeMap<Vec<u8>, Node>;

/// A commit reuses the base's trees without reading or re-storing their chunks. Under the GC
/// protocol (docs/gc.md, "Snapshots that reuse trees") that is safe when the base exists
/// both once the writer's lease exists and once the lease is committed: every GC run then
/// either marked the base (it existed at the run's first or second mark, an interval that
/// the two checks bracket) or lists the committed lease and marks the new root itself.
/// Writers call this before the work (to fail early) and after the lease commit.
pub async fn check_base_alive(repo: &Repository, base: &Id) -> Result<()> {
    use object_store::ObjectStoreExt;
    let name = snapshot::object_name(base);
    match repo.store().head(&object_store::path::Path::from(name.as_str())).await {
        Ok(_) => Ok(()),
        Err(object_store::Error::NotFound { .. }) => Err(Error::Conflict(format!(
            "snapshot {base} that this change is based on was forgotten; its data may be collected, \
             so nothing was committed"
        ))),
        Err(e) => Err(Error::store(name, e)),
    }
}

impl Walker<'_> {
    /// Merge the upper directory `upper` over the overlay's base root.
    pub fn overlay_root(&self, upper: &Path, ov: &Overlay) -> Result<Node> {
        let meta = std::fs::symlink_metadata(upper).at(upper)?;
        if !meta.is_dir() {
            return Err(Error::Usage(format!("{} is not a directory", upper.display())));
        }
        let NodeKind::Dir { tree } = &ov.root.kind else {
            return Err(Error::Usage("an overlay's base must be a directory snapshot".into()));
        };
        let lower = self.lower_dir(ov, tree)?;
        self.overlay_dir(upper, upper, ov.root.name.clone(), &meta, Some(lower), ov)
    }

    fn lower_dir(&self, ov: &Overlay, tree: &Id) -> Result<Lower> {
        let nodes = ov.handle.block_on(ov.repo.read_dir(tree))?;
        Ok(nodes.into_iter().map(|n| (n.name.clone(), n)).collect())
    }

    fn lower_of(&self, node: Option<&Node>, ov: &Overlay) -> Result<Option<Lower>> {
        match node.map(|n| &n.kind) {
            Some(NodeKind::Dir { tree }) => self.lower_dir(ov, tree).map(Some),
            _ => Ok(None),
        }
    }

    /// The lower directory an upper directory `path` is merged with, if any.
    fn lower_for(
        &self,
        path: &Path,
        name: &[u8],
        parent: Option<&Lower>,
        ov: &Overlay,
    ) -> Result<Option<Lower>> {
        if xattr_bytes(path, OPAQUE)?.is_some_and(|v| v == b"y") {
            return Ok(None);
        }
        match xattr_bytes(path, REDIRECT)? {
            // Absolute: a path from the overlay's root, looked up in the base snapshot.
            Some(target) if target.starts_with(b"/") => {
                let mut node = Some(ov.root.clone());
                for part in target.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
                    node = match node.map(|n| n.kind) {
                        Some(NodeKind::Dir { tree }) => ov.handle.block_on(ov.repo.lookup(&tree, part))?,
                        _ => None,
                    };
                }
                self.lower_of(node.as_ref(), ov)
            }
            // Relative: a name in the parent's lower directory; never a path.
            Some(target) if target.contains(&b'/') || target.is_empty() => Err(Error::Usage(format!(
                "{}: invalid overlayfs redirect {:?}",
                path.display(),
                String::from_utf8_lossy(&target)
            ))),
            Some(target) => self.lower_of(parent.and_then(|l| l.get(&target)), ov),
            None => self.lower_of(parent.and_then(|l| l.get(name)), ov),
        }
    }

    /// Merge the upper directory `path` (reached at `at`, see [`Anchored`]) over `lower`.
    fn overlay_dir(
        &self,
        path: &Path,
        at: &Path,
        name: Vec<u8>,
        meta: &Metadata,
        lower: Option<Lower>,
        ov: &Overlay,
    ) -> Result<Node> {
        if self.cancel.load(Relaxed) {
            return Err(Error::Interrupted);
        }
        self.counts.dirs.fetch_add(1, Relaxed);
        // The upper directory is the sandbox's to change while a live mount is committed.
        let dir = Anchored::open(at, meta, libc::O_DIRECTORY).at(path)?;
        let entries: Vec<Vec<u8>> = std::fs::read_dir(dir.at())
            .at(path)?
            .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
            .collect::<std::io::Result<_>>()
            .at(path)?;
        // None: the name is deleted (whiteout); Some: the upper entry replaces the lower one.
        let changes: Vec<Option<(Vec<u8>, Option<Node>)>> = entries
            .into_par_iter()
            .map(|child_name| {
                let child = path.join(std::ffi::OsStr::from_bytes(&child_name));
                let child_at = dir.at().join(std::ffi::OsStr::from_bytes(&child_name));
                self.settled(&child, &child_at, |m| {
                    if is_whiteout(m) {
                        return Ok(Some((child_name.clone(), None)));
                    }
                    let node = if m.is_dir() {
                        let sub = self.lower_for(&child_at, &child_name, lower.as_ref(), ov)?;
                        self.overlay_dir(&child, &child_at, child_name.clone(), m, sub, ov)?
                    } else {
                        if m.is_file() && xattr_bytes(&child_at, METACOPY)?.is_some() {
                            return Err(Error::Usage(format!(
                                "{} is an overlayfs metacopy file; mount with metacopy=off",
                                child.display()
                            )));
                        }
                        self.node(&child, &child_at, child_name.clone(), m)?
                    };
                    Ok(Some((child_name.clone(), Some(node))))
                })
            })
            .collect::<Result<_>>()?;
        let mut merged = lower.unwrap_or_default();
        for (child_name, change) in changes.into_iter().flatten() {
            match change {
                Some(node) => merged.insert(child_name, node),
                None => merged.remove(&child_name),
            };
        }
        let tree = self.store_tree(merged.into_values().collect())?;
        Ok(Node {
            name,
            kind: NodeKind::Dir { tree },
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime_ns: nanos(meta.mtime(), meta.mtime_nsec()),
            xattrs: self.xattrs(at).map_err(|e| match e {
                Error::Io { source, .. } => Error::io(path, source),
                e => e,
            })?,
            link_group: None,
        })
    }
}

fn is_whiteout(m: &Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

/// An xattr's value; absent also when the file itself vanished meanwhile.
fn xattr_bytes(path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    match xattr::get(path, name) {
        Ok(v) => Ok(v.map(|mut v| {
            while v.last() == Some(&0) {
                v.pop();
            }
            v
        })),
        Err(e)
            if matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::ENODATA) | Some(libc::ENOENT)) =>
        {
            Ok(None)
        }
        Err(e) => Err(Error::io(path, e)),
    }
}
